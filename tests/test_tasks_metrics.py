"""Tasks load from local JSONL / shared data / built-in data with one-line errors; metrics are right."""

from __future__ import annotations

import json

import pytest

from bildexp import BildexpError
from bildexp.metrics import score, split_sentences
from bildexp.tasks import default_data_dir, load_task

from conftest import make_config

SHARED = default_data_dir()


def test_local_jsonl_and_limit(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"id": i, "source": f"s{i}", "reference": f"r{i}"}) + "\n" for i in range(5)))
    data = load_task(make_config(f"task.data_file={f}").task, limit=3)
    assert [e.id for e in data.examples] == ["0", "1", "2"]
    assert data.data_source == f"local:{f}"


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(BildexpError, match="not found") as err:
        load_task(make_config(f"task.data_file={tmp_path / 'nope.jsonl'}").task)
    assert "\n" not in str(err.value)


def test_bad_rows_are_rejected(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"id": 1, "source": "x"}) + "\n")
    with pytest.raises(BildexpError, match="lacks reference"):
        load_task(make_config(f"task.data_file={f}").task)


@pytest.mark.skipif(not (SHARED / "iwslt2017_de_en").is_dir(), reason="../shared/data not present")
@pytest.mark.parametrize("task,split", [("iwslt", "tst2017"), ("wmt", "newstest2014"), ("xsum", "test-1000a"), ("cnndm", "test-0-2000.lower-ptb"), ("multi30k", "validation")])
def test_paper_tasks_use_shared_data_offline(task, split):
    data = load_task(make_config(f"task={task}").task, limit=2)
    assert data.data_source.startswith("local:") and data.split == split
    assert len(data.examples) == 2 and data.examples[0].reference


def test_hub_offline_is_one_line(tmp_path):
    cfg = make_config("task=iwslt", "task.data_source=hub").task
    with pytest.raises(BildexpError, match="pass task.data_file=PATH") as err:
        load_task(cfg)
    assert "\n" not in str(err.value)


def test_truncation_is_counted(tiny_pair, toy_examples):
    from bildexp.tasks import encode

    cfg = make_config("task.max_source_tokens=4").task
    prompt, truncated = encode(toy_examples[0], cfg, tiny_pair)
    assert truncated
    n = prompt.encoder_input_ids.shape[1] if tiny_pair.is_encoder_decoder else None
    if n is not None:
        assert n == 4 and int(prompt.encoder_input_ids[0, -1]) in tiny_pair.eos_token_ids
    _, not_truncated = encode(toy_examples[0], make_config().task, tiny_pair)
    assert not not_truncated


def test_bleu_and_rouge():
    refs = ["the cat sat on the mat .", "a dog barked loudly ."]
    perfect = score("bleu", refs, refs)
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["bleu_signature"].startswith("nrefs:1")
    assert score("bleu", ["completely different words here", "nothing"], refs)["bleu"] < 10
    r = score("rougeL", ["the cat sat on a mat"], ["the cat sat on the mat"])
    assert 0 < r["rougeL"] < 100 and set(r) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    # Stemming: "running" and "runs" share the stem "run".
    assert score("rouge1", ["dogs running"], ["dog runs"])["rouge1"] == pytest.approx(100.0)


def test_rouge_lsum_splits_sentences():
    assert split_sentences("First one. Second one! Third?") == "First one.\nSecond one!\nThird?"
    ref = "a b c .\nd e f ."
    # Sentence order swapped: ROUGE-L (one sequence) drops, ROUGE-Lsum (per sentence union LCS) does not.
    s = score("rougeLsum", ["d e f . a b c ."], [ref])
    assert s["rougeLsum"] == pytest.approx(100.0) and s["rougeL"] < 100.0


def test_decoder_only_prompt_uses_chat_template_when_present(toy_examples):
    import copy

    from bildexp.models import load_pair

    from bildexp.tasks import encode

    pair = copy.copy(load_pair(make_config("pair=tiny_llama").pair))
    cfg = make_config("pair=tiny_llama", "task.instruction=Translate: ").task
    plain, _ = encode(toy_examples[0], cfg, pair)
    assert pair.tokenizer.decode(plain.decoder_prefix, skip_special_tokens=True) == cfg.prompt_template.replace("{source}", toy_examples[0].source)
    tok = copy.deepcopy(pair.tokenizer)
    tok.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    pair.tokenizer = tok
    chat, _ = encode(toy_examples[0], cfg, pair)
    assert tok.decode(chat.decoder_prefix) == f"<|user|>Translate: {toy_examples[0].source}<|assistant|>"


def test_paper_scoring_round_trips_references_and_does_not_stem(tiny_pair):
    """The paper's pipeline: references cut at reference_tokens by the pair's tokenizer; ROUGE without stemming."""
    from bildexp.metrics import paper_score, round_trip

    tok = tiny_pair.tokenizer
    long_ref = "the fox remembers my window across every green river and the river remembers the fox"
    cut = round_trip([long_ref, "a b"], tok, 6)
    assert cut[1] == "a b" and long_ref.startswith(cut[0]) and len(tok(cut[0]).input_ids) <= 6 < len(tok(long_ref).input_ids)
    assert score("rouge1", ["dogs running"], ["dog runs"])["rouge1"] == pytest.approx(100.0)  # stemmed
    assert paper_score("rouge1", ["dogs running"], ["dog runs"], tok, 128)["paper_rouge1"] == 0.0  # not stemmed
    full = paper_score("bleu", [long_ref], [long_ref], tok, 128)["paper_bleu"]
    assert full == pytest.approx(100.0) and paper_score("bleu", [long_ref], [long_ref], tok, 6)["paper_bleu"] < 100


def test_paper_rouge_lsum_needs_punkt_and_says_so(monkeypatch, tiny_pair):
    """Without NLTK's punkt the paper's ROUGE-Lsum is not computed (never replaced by another split), and a run
    whose headline it is stops before decoding with one line."""
    from bildexp import metrics

    monkeypatch.setattr(metrics, "punkt_missing", lambda: "punkt is not installed (stand-in)")
    assert "paper_rougeLsum" not in metrics.paper_score("rougeLsum", ["a b."], ["a b."], tiny_pair.tokenizer, 128)
    with pytest.raises(BildexpError, match="task.scoring=paper scores rougeLsum on NLTK's sentences") as err:
        metrics.check_scoring("paper", "rougeLsum")
    assert "\n" not in str(err.value)
    metrics.check_scoring("standard", "rougeLsum")
    metrics.check_scoring("paper", "rougeL")


@pytest.mark.parametrize("scoring", ["standard", "paper"])
def test_rows_carry_both_scorings(scoring, tmp_path):
    from bildexp.models import PairCache
    from bildexp.runner import run

    row = run(make_config("runner.limit=3", "runner.warmup=0", f"task.scoring={scoring}", f"runner.output_dir={tmp_path}",
                          "runner.progress=false"), PairCache())
    assert {"bleu", "paper_bleu"} <= row.keys() and row["scoring"] == scoring
    assert row["headline_score"] == row["paper_bleu" if scoring == "paper" else "bleu"]



@pytest.mark.parametrize("line,message", [
    ('{"id": 1, "source": "a", "reference": "b"}\n{"id": 2, "source": "a", "reference": \n', r"d.jsonl:2 is not valid JSON"),
    ('{"id": 1, "source": "a", "reference": "b"}\n\n["a", "b"]\n', r"d.jsonl:3 is a JSON list, not an object"),
    ('{"id": 1, "source": null, "reference": "b"}\n', r"d.jsonl:1: source is null, not a string"),
    ('{"id": 1, "source": "a", "reference": 7}\n', r"d.jsonl:1: reference is 7, not a string"),
    ('{"id": 1, "source": "  ", "reference": "b"}\n', r"d.jsonl:1: the source is empty"),
    ('{"id": 1, "source": "a", "reference": "b"}\n{"id": "1", "source": "c", "reference": "d"}\n', r"d.jsonl:2: id '1' repeats line 1"),
])
def test_bad_jsonl_is_one_line_naming_file_and_line(tmp_path, line, message):
    f = tmp_path / "d.jsonl"
    f.write_text(line)
    with pytest.raises(BildexpError, match=message) as err:
        load_task(make_config(f"task.data_file={f}").task)
    assert "\n" not in str(err.value)
