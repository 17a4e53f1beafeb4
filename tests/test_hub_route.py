"""Issue 13: the networked route, rehearsed offline on a stand-in HF hub cache (tests/hub_standin.py).

`bildexp run task=iwslt policy=bild` and every conf/experiment/*/paper.yaml (its prepare commands included)
run with HF_HUB_OFFLINE=1 through the loading code a user with the hub hits: hub model ids through
from_pretrained, dataset ids at their parquet revision through snapshot_download. The stand-in holds the
hub's real ids, revisions, configs, splits and field names, so a config naming a wrong one fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hub_standin
from bildexp import BildexpError
from bildexp.reproduce import artifacts, run_tiny
from bildexp.tasks import load_task, load_train

from conftest import make_config
from test_reproduce import assert_every_sweep_ran, check_figures

PAPER = [a for a in artifacts() if a.endswith("/paper")]
HUB_TASKS = ["iwslt", "wmt", "xsum", "cnndm", "cnndm_ppd", "wmt15_enfr", "squad"]


@pytest.fixture(scope="module")
def standin_hub(tmp_path_factory):
    """The stand-in cache, named by HF_HUB_CACHE for subprocesses and by huggingface_hub's constant in this
    process (read at import); the datasets library's arrow cache in a scratch folder too; and a stand-in for
    NLTK's punkt model (the paper variants score CNN/DM's ROUGE-Lsum on its sentences)."""
    import datasets.config
    import huggingface_hub.constants
    import nltk

    cache = tmp_path_factory.mktemp("hf_hub")
    held = hub_standin.build(cache)
    saved = (huggingface_hub.constants.HF_HUB_CACHE, datasets.config.HF_DATASETS_CACHE, list(nltk.data.path))
    huggingface_hub.constants.HF_HUB_CACHE = str(cache)
    datasets.config.HF_DATASETS_CACHE = str(tmp_path_factory.mktemp("hf_datasets"))
    nltk.data.path.insert(0, str(hub_standin.punkt(tmp_path_factory.mktemp("nltk_data"))))
    yield cache, held
    huggingface_hub.constants.HF_HUB_CACHE, datasets.config.HF_DATASETS_CACHE, nltk.data.path[:] = saved


@pytest.mark.parametrize("task", HUB_TASKS)
def test_each_paper_task_loads_from_the_hub(task, standin_hub):
    """Each paper task resolves its namespaced id, the parquet revision, its config, split and fields."""
    _, held = standin_hub
    cfg = make_config(f"task={task}", "task.data_source=hub").task
    data = load_task(cfg)
    assert cfg.hub_dataset in held["datasets"]
    assert data.data_source.startswith(f"hub:{cfg.hub_dataset}@refs/convert/parquet:") and data.split == cfg.split
    assert len(data.examples) == 4 and all(e.source and e.reference for e in data.examples)
    if task == "squad":  # two fields of a row in one source, the first answer as the reference
        assert "please answer the question: What follows?" in data.examples[0].source
    if task == "xsum":  # the empty document is dropped and counted
        assert data.data_source.endswith("(1 empty dropped)")


def test_training_split_expressions_load_from_the_hub(standin_hub):
    cfg = make_config("task=wmt", "task.data_source=hub", "task.train_split='train[:10%]+train[45%:55%]+train[-5%:]'").task
    data = load_train(cfg)
    assert len(data.examples) == 2 + 2 + 1 and data.data_source.startswith("hub:wmt/wmt14@")


@pytest.mark.parametrize("override,message", [
    ("task.hub_dataset=iwslt2017", "cannot fetch dataset iwslt2017 at revision refs/convert/parquet"),  # the old id
    ("task.hub_revision=main", "cannot fetch dataset IWSLT/iwslt2017 at revision main"),  # script-only main
    ("task.hub_config=iwslt2017-en-de", "config 'iwslt2017-en-de' or split 'validation' is wrong"),
    ("task.split=valid", "config 'iwslt2017-de-en' or split 'valid' is wrong"),
    ("task.source_field=translation.fr", "row 0 lacks translation.fr"),
    ("task.target_field=target", "has no field 'target'"),
])
def test_a_wrong_id_revision_config_split_or_field_is_one_line(override, message, standin_hub):
    with pytest.raises(BildexpError, match=message) as err:
        load_task(make_config("task=iwslt", "task.data_source=hub", override).task)
    assert "\n" not in str(err.value)


def test_checkpoints_load_as_the_official_code_built_them(standin_hub):
    """mT5 keeps its own (untied) head without output scaling, T5 v1.0 its tied head scaled by d_model**-0.5, and
    resize_to_tokenizer keeps each matrix's first len(tokenizer) rows (transformers' own resize would tie mT5's head)."""
    from bildexp.models import load_pair

    cache, _ = standin_hub
    for pair, kind in (("mt5_iwslt", "mt5"), ("t5_xsum", "t5")):
        cfg = make_config(f"pair={pair}", "pair.device=cpu").pair
        assert cfg.resize_to_tokenizer
        loaded = load_pair(cfg)
        model, n = loaded.large, len(loaded.tokenizer)
        folder = next((cache / f"models--{cfg.large.replace('/', '--')}" / "snapshots").iterdir())
        saved = torch.load(folder / "pytorch_model.bin")
        head = model.get_output_embeddings().weight
        assert head.shape[0] == n == saved["shared.weight"].shape[0] - hub_standin.EXTRA_ROWS[kind]
        assert torch.equal(head, saved["lm_head.weight"][:n]) and torch.equal(model.shared.weight, saved["shared.weight"][:n])
        assert (head.data_ptr() == model.shared.weight.data_ptr()) == (kind == "t5")
        enc = torch.tensor([[5, 6, 7, loaded.tokenizer.eos_token_id]])
        out = model(input_ids=enc, decoder_input_ids=torch.tensor([[0, 9]]), output_hidden_states=True)
        scale = model.config.d_model ** -0.5 if kind == "t5" else 1.0
        torch.testing.assert_close(out.logits, (out.decoder_hidden_states[-1] * scale) @ saved["lm_head.weight"][:n].T)


def test_bildexp_run_iwslt_bild_walks_the_hub_route(standin_hub, tmp_path):
    """The headline command, as a user types it, in a fresh process that sees only HF_HUB_CACHE (and no
    ../shared/data: BILDEXP_DATA names an empty folder, so the task's default data source falls to the hub)."""
    cache, _ = standin_hub
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_DATASETS_CACHE": str(tmp_path / "ds"), "HF_HUB_OFFLINE": "1",
           "BILDEXP_DATA": str(tmp_path / "no_shared_data")}
    proc = subprocess.run([sys.executable, "-m", "bildexp.cli", "run", "task=iwslt", "policy=bild", "runner.limit=2",
                           "runner.warmup=0", "task.max_new_tokens=8", "pair.device=cpu", f"runner.output_dir={tmp_path}",
                           "runner.progress=false"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(next((tmp_path / "runs").glob("*/*/row.json")).read_text())
    assert row["data"] == "hub:IWSLT/iwslt2017@refs/convert/parquet:iwslt2017-de-en" and row["data_split"] == "validation"
    assert row["pair"] == "mt5_iwslt" and row["large"] == "kssteven/mT5-large-iwslt2017-de-en" and row["n_examples"] == 2
    assert row["scoring"] == "standard" and row["headline_score"] == row["bleu"] and "paper_bleu" in row


@pytest.fixture(scope="module")
def rehearsals(standin_hub, tmp_path_factory):
    """One output folder for every paper variant's rehearsal, filled artifact by artifact as the tests ask;
    trained checkpoints land under the working directory, a scratch folder here."""
    folder, work = tmp_path_factory.mktemp("paper_results"), tmp_path_factory.mktemp("paper_work")
    rows: dict[str, list[dict]] = {}

    def get(experiment: str) -> tuple[Path, list[dict]]:
        if experiment not in rows:
            with pytest.MonkeyPatch.context() as mp:
                mp.chdir(work)
                rows[experiment] = run_tiny(experiment, folder, rehearse=True)
        return folder, rows[experiment]

    return get


# bild_fig10/paper runs exactly bild_fig4_table1/paper's sweeps (Figure 10 is drawn from the same runs).
@pytest.mark.parametrize("experiment", [a for a in PAPER if a != "bild_fig10/paper"])
def test_paper_artifact_rehearses_the_hub_route(experiment, rehearsals):
    """Every paper variant's prepare commands (shrunk) and sweeps (value axes at their first value) on the paper's
    own hub pairs and data."""
    _, rows = rehearsals(experiment)
    assert_every_sweep_ran(experiment, rows, "rehearse")
    assert all(r["n_examples"] == 1 and str(r["data"]).startswith("hub:") for r in rows), [r["data"] for r in rows]
    assert not any(str(r["large"]).startswith("builtin:") for r in rows)
    if experiment.startswith("bild_"):  # scored as the paper's pipeline scores, sources cut as its code cuts them
        assert all(r["scoring"] == "paper" and r["headline_score"] == r[f"paper_{r['headline_metric']}"]
                   and r["max_source_tokens"] == 1024 for r in rows)


def test_fig10_paper_runs_fig4_table1s_sweeps():
    from bildexp.reproduce import plan

    assert [s[1:] for s in plan("bild_fig10/paper")[1]] == [s[1:] for s in plan("bild_fig4_table1/paper")[1]]


def test_figures_from_every_paper_rehearsal(rehearsals, tmp_path):
    for experiment in PAPER:
        if experiment != "bild_fig10/paper":
            folder, _ = rehearsals(experiment)
    check_figures(folder, tmp_path)


@pytest.mark.parametrize("override", ["pair.large=kssteven/mT5-large-iwslt2017", "pair.tokenizer=google/mt5-base"])
def test_a_wrong_model_id_is_one_line(override, standin_hub):
    from bildexp.models import load_pair

    with pytest.raises(BildexpError, match="HF_HUB_OFFLINE=1") as err:
        load_pair(make_config("pair=mt5_iwslt", "pair.device=cpu", override).pair)
    assert "\n" not in str(err.value)
