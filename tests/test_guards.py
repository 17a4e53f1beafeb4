"""Guards against silent garbage and against pages of traceback: an older transformers that drops the KV cache,
non-finite logits, a mistyped config key in a single run or a sweep. Each stops in one line that says what to do."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from bildexp import BildexpError
from bildexp.cache import check_cache_keyword
from bildexp.cli import main
from bildexp.config import PolicyConfig
from bildexp.policies import make_policy
from bildexp.tasks import encode

from conftest import make_config


class DropsCache(torch.nn.Module):
    """What transformers 5.17-5.23 do with `cache=`: accept it through **kwargs and drop it (the model then builds a
    cache of its own, and the caller's stays empty)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config = model.config

    @property
    def device(self):
        return self.inner.device

    def forward(self, cache=None, **kwargs):
        return self.inner(**kwargs)


def test_a_transformers_that_drops_the_cache_keyword_stops_in_one_line(tiny_pair):
    check_cache_keyword(tiny_pair.large)  # the installed release writes the cache it is given
    with pytest.raises(BildexpError, match=r"^transformers \S+ ignores the KV cache .* pip install 'transformers>=5.24,<6'$") as err:
        check_cache_keyword(DropsCache(tiny_pair.large))
    assert "\n" not in str(err.value)


def test_non_finite_logits_stop_in_one_line(tiny_pair, toy_examples):
    """A model whose logits are not finite (fp16 T5/mT5 overflow; here broken weights): one line naming the dtype, the
    position and what to do (in float16: float32 or bfloat16)."""
    broken = dataclasses.replace(tiny_pair, large=copy.deepcopy(tiny_pair.large))
    with torch.no_grad():
        broken.large.get_output_embeddings().weight.fill_(float("inf"))
    prompt = encode(toy_examples[0], make_config().task, broken)[0]
    with pytest.raises(BildexpError, match=r"non-finite logits \(inf/NaN\) in torch.float32 at decoder position \d+: check "
                                           r"the model's weights") as err:
        make_policy(PolicyConfig(name="vanilla")).decode(broken, prompt, 8)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("sweep", [True, False])
def test_a_mistyped_key_is_one_line_naming_the_known_keys(sweep, tmp_path, capsys):
    """`bildexp run -m ... runner.interleav=true` as a new user types it: one line, no omegaconf trace, no run."""
    argv = ["run", *(["-m"] if sweep else []), "pair=tiny_t5", "runner.limit=1", f"runner.output_dir={tmp_path}",
            "runner.interleav=true"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith("bildexp: error: unknown key runner.interleav: runner has output_dir, limit, warmup, force, repeat")
    assert not list(tmp_path.glob("*.csv"))


def test_cuda_graph_modes_come_from_torchs_own_mode_options():
    """Every compile mode that turns CUDA graphs on is treated as such (max-autotune too, not only reduce-overhead);
    none on a CPU."""
    from bildexp.cache import uses_cudagraphs

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert [uses_cudagraphs(m, cuda) for m in ("reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "default", "none")] == [
        True, True, False, False, False]
    assert not uses_cudagraphs("reduce-overhead", cpu)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_benchmarks_told_cuda_refuse_to_time_the_cpu():
    from bildexp.runner import benchmark_inputs

    with pytest.raises(SystemExit, match=r"^error: pair.device=cuda but no CUDA device is visible"):
        benchmark_inputs("demo", "tiny_t5", 1, "cuda")
