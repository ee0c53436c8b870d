"""Conversion and pretraining: the written directory loads everywhere, runs resume exactly,
and bad inputs fail with messages that name the problem."""

import json

import pytest
import torch
from safetensors.torch import load_file

import rollout.train.loop as training_module
from rollout import Engine, SamplingParams
from rollout.config import TIDAR_CONFIG_FILE, EngineConfig
from rollout.train.convert import (
    MASK_TOKEN,
    convert,
    convert_parser,
    pretrain,
    pretrain_parser,
    train_tokenizer,
)
from rollout.train.corpus import PYTHON_SOURCES, is_heldout, open_corpus, python_sources
from rollout.train.tiny import make_tiny_model

VOCAB = 300
SNIPPETS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
    "while True:\n    break\n",
    "x = [n for n in range(100) if n % 3 == 0]\n",
]
TEXTS = [s * 3 + f"# document {i}\n" for i, s in enumerate(SNIPPETS * 30)]
SMALL = dict(steps=3, batch_size=2, seq_len=32, lr=1e-3, warmup=1, block_size=4, seed=0, device="cpu")


@pytest.fixture(scope="module")
def jsonl_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "data.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


@pytest.fixture(scope="module")
def folder_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("folder")
    for i, t in enumerate(TEXTS):
        (folder / f"doc{i}.py").write_text(t)
    return folder


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """make_tiny_model (config EOS 1) with a byte-level BPE tokenizer of the same vocabulary (EOS 0)."""
    path = make_tiny_model(tmp_path_factory.mktemp("base"), vocab_size=VOCAB, init_std=0.02)
    (path / TIDAR_CONFIG_FILE).unlink()  # an AR base model has no TiDAR settings
    train_tokenizer(iter(TEXTS), VOCAB).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def converted(base_dir, jsonl_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    metrics = convert(base_dir, jsonl_corpus, out, **SMALL)
    return out, metrics


def test_converted_model_generates_through_engine(converted):
    out, _ = converted
    engine = Engine.from_pretrained(out, config=EngineConfig(drafting="fixed"))
    assert engine.tidar.block_size == 4
    for temperature in (0.0, 1.0):
        completions = engine.generate([[5, 6, 7], [8]], SamplingParams(max_tokens=12, temperature=temperature, seed=0))
        assert all(len(c[0].token_ids) == 12 for c in completions)


def test_mask_token_is_a_new_special_token(converted, base_dir):
    from transformers import AutoTokenizer

    out, metrics = converted
    tidar = json.loads((out / TIDAR_CONFIG_FILE).read_text())
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tidar == {"mask_token_id": VOCAB, "block_size": 4}
    assert tokenizer.convert_tokens_to_ids(MASK_TOKEN) == VOCAB
    assert json.loads((out / "config.json").read_text())["vocab_size"] == VOCAB + 1
    base_embed = load_file(base_dir / "model.safetensors")["model.embed_tokens.weight"]
    assert base_embed.shape[0] == VOCAB and metrics["conversion"]["mask_token_id"] == VOCAB


def test_converted_model_loads_in_transformers_with_same_logits(converted):
    import transformers

    out, _ = converted
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    engine = Engine.from_pretrained(out, config=EngineConfig(drafting="fixed"))
    ids = [[5, 6, 7, 8, 9]]
    with torch.no_grad():
        hf_logits = hf(torch.tensor(ids)).logits[0]
    torch.testing.assert_close(engine.forward_logits(ids)[0], hf_logits, atol=1e-4, rtol=1e-4)
    assert hf.config.vocab_size == VOCAB + 1


def test_metrics_record_losses_and_heldout_perplexity(converted):
    out, metrics = converted
    assert json.loads((out / "metrics.json").read_text()) == metrics
    final = metrics["conversion"]["final"]
    assert final["step"] == SMALL["steps"] and final["ar"] > 0 and final["diff"] > 0
    ppl = metrics["heldout_ar_perplexity"]
    assert 1 < ppl["base"] < VOCAB * 10 and 1 < ppl["converted"] < VOCAB * 10
    assert metrics["conversion"]["train_tokens"] == SMALL["steps"] * SMALL["batch_size"] * SMALL["seq_len"]


def test_folder_corpus_converts(base_dir, folder_corpus, tmp_path):
    metrics = convert(base_dir, folder_corpus, tmp_path / "out", **{**SMALL, "steps": 1})
    assert (tmp_path / "out" / "model.safetensors").exists() and metrics["conversion"]["steps"] == 1


def test_export_writes_a_checkpoint_as_a_loadable_model(converted, tmp_path):
    from rollout.train.convert import export_checkpoint
    out, _ = converted
    step = export_checkpoint(out, tmp_path / "exported")
    assert step == SMALL["steps"]
    params = SamplingParams(max_tokens=8, n=2, seed=3)
    assert [c.token_ids for c in Engine.from_pretrained(tmp_path / "exported", config=EngineConfig(drafting="fixed")).generate([[5, 6, 7]], params)[0]] == \
        [c.token_ids for c in Engine.from_pretrained(out, config=EngineConfig(drafting="fixed")).generate([[5, 6, 7]], params)[0]]
    with pytest.raises(FileNotFoundError, match="state.pt does not exist"):
        export_checkpoint(tmp_path / "exported", tmp_path / "again")
    # a run still going has no config.json yet: --like names where the files come from
    (tmp_path / "running" / "checkpoint").mkdir(parents=True)
    (tmp_path / "running" / "checkpoint" / "state.pt").write_bytes((out / "checkpoint" / "state.pt").read_bytes())
    with pytest.raises(FileNotFoundError, match="--like"):
        export_checkpoint(tmp_path / "running", tmp_path / "again")
    assert export_checkpoint(tmp_path / "running", tmp_path / "again", like=out) == step
    assert (tmp_path / "again" / "tidar_config.json").exists()


def test_resumed_run_equals_uninterrupted_run(base_dir, jsonl_corpus, tmp_path, monkeypatch):
    settings = {**SMALL, "steps": 4, "checkpoint_every": 2}
    convert(base_dir, jsonl_corpus, tmp_path / "full", **settings)

    calls = {"n": 0}
    real = training_module.sample_windows

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:  # dies during step 4, after the step-2 checkpoint
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(training_module, "sample_windows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(base_dir, jsonl_corpus, tmp_path / "resumed", **settings)
    monkeypatch.setattr(training_module, "sample_windows", real)
    assert torch.load(tmp_path / "resumed" / "checkpoint" / "state.pt", weights_only=False)["step"] == 2
    convert(base_dir, jsonl_corpus, tmp_path / "resumed", resume=True, **settings)
    full = load_file(tmp_path / "full" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert full.keys() == resumed.keys()
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], atol=0, rtol=0)


def test_existing_checkpoint_needs_resume(converted, base_dir, jsonl_corpus):
    out, _ = converted
    with pytest.raises(FileExistsError, match="resume"):
        convert(base_dir, jsonl_corpus, out, **SMALL)


def test_pretrained_model_loads_in_engine_transformers_and_tokenizer(folder_corpus, tmp_path):
    import transformers

    out = tmp_path / "scratch"
    metrics = pretrain(out, folder_corpus, vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                       num_kv_heads=2, intermediate_size=64, max_position_embeddings=128, steps=2,
                       batch_size=2, seq_len=32, warmup=1, device="cpu")
    assert metrics["pretraining"]["steps"] == 2
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "def add(a, b):\n    return a + b\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert hf.config.vocab_size == len(tokenizer) == VOCAB
    assert not (out / TIDAR_CONFIG_FILE).exists()
    tidar = convert(out, folder_corpus, tmp_path / "tidar", **{**SMALL, "steps": 1})
    engine = Engine.from_pretrained(tmp_path / "tidar", config=EngineConfig(drafting="fixed"))
    assert engine.tidar.mask_token_id == tidar["conversion"]["mask_token_id"] == VOCAB
    engine.generate([tokenizer(text)["input_ids"]], SamplingParams(max_tokens=8, seed=0))


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("mask_id", [0, 1])
def test_mask_token_equal_to_eos_is_refused(base_dir, jsonl_corpus, tmp_path, mask_id):
    # 0 is the tokenizer's EOS/pad, 1 the EOS of config.json
    with pytest.raises(ValueError, match=f"mask_token_id {mask_id} is the model's EOS/pad"):
        convert(base_dir, jsonl_corpus, tmp_path / "out", mask_token_id=mask_id, **SMALL)


def test_reserved_mask_token_id_keeps_the_vocabulary(base_dir, jsonl_corpus, tmp_path):
    metrics = convert(base_dir, jsonl_corpus, tmp_path / "out", mask_token_id=VOCAB - 1, **{**SMALL, "steps": 1})
    assert metrics["conversion"]["mask_token_id"] == VOCAB - 1
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == VOCAB


def test_missing_corpus_folder_is_reported(base_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus .*nowhere does not exist"):
        convert(base_dir, tmp_path / "nowhere", tmp_path / "out", **SMALL)


def test_missing_base_directory_is_reported(jsonl_corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory .*no_model does not exist"):
        convert(tmp_path / "no_model", jsonl_corpus, tmp_path / "out", **SMALL)


def test_base_without_tokenizer_is_reported(jsonl_corpus, tmp_path):
    base = make_tiny_model(tmp_path / "bare", vocab_size=VOCAB)
    with pytest.raises(FileNotFoundError, match="no loadable tokenizer"):
        convert(base, jsonl_corpus, tmp_path / "out", **SMALL)


def test_empty_corpus_folder_is_reported(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("")
    with pytest.raises(ValueError, match="no non-empty text files"):
        open_corpus(tmp_path / "empty")


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl line 2 is not valid JSON"):
        open_corpus(path)


def test_jsonl_line_without_text_field_names_file_and_line(tmp_path):
    path = tmp_path / "notext.jsonl"
    path.write_text('{"text": "fine"}\n\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r'notext\.jsonl line 3 has no string field "text"'):
        open_corpus(path)


def test_jsonl_with_only_blank_texts_is_empty(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text('{"text": "  "}\n')
    with pytest.raises(ValueError, match="is empty"):
        open_corpus(path)


def test_unknown_corpus_kind_is_reported(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("a,b\n")
    with pytest.raises(ValueError, match="must be a folder, a .jsonl file"):
        open_corpus(path)


def test_block_size_below_two_is_refused(base_dir, jsonl_corpus, tmp_path):
    with pytest.raises(ValueError, match="block_size must be >= 2"):
        convert(base_dir, jsonl_corpus, tmp_path / "out", **{**SMALL, "block_size": 1})


# ---------------------------------------------------------------- corpus and CLI
def test_heldout_split_depends_only_on_the_key():
    keys = [f"stdlib/module_{i}.py" for i in range(2000)]
    heldout = [k for k in keys if is_heldout(k)]
    assert heldout == [k for k in reversed(keys) if is_heldout(k)][::-1]
    assert 10 < len(heldout) < 80  # ~2% of 2000


def test_python_sources_splits_stdlib_and_site_packages_once():
    corpus = python_sources()
    keys = [d.key for d in corpus.train + corpus.heldout]
    assert len(keys) == len(set(keys))
    assert any(k.startswith("stdlib/") for k in keys) and any(k.startswith("purelib/") for k in keys)
    assert not any(k.startswith("stdlib/site-packages/") for k in keys)
    assert all(is_heldout(d.key) for d in corpus.heldout) and not any(is_heldout(d.key) for d in corpus.train)
    assert open_corpus(PYTHON_SOURCES).name == PYTHON_SOURCES


@pytest.mark.parametrize("parser", [convert_parser, pretrain_parser])
def test_every_cli_flag_has_help(parser):
    for action in parser()._actions:
        assert action.help, f"{action.option_strings} has no help"


def cli_convert(base, corpus, out, *extra) -> list[str]:
    return ["convert", "--base", str(base), "--corpus", str(corpus), "--out", str(out), "--batch-size", "2",
            "--seq-len", "32", "--block-size", "4", "--device", "cpu", "--lr", "1e-3", *extra]


def test_cli_convert_exits_0_and_caps_the_default_warmup_at_the_steps(base_dir, jsonl_corpus, tmp_path, caplog):
    """`python -m rollout convert` (rollout/__main__.py exits with main()'s value): a short run
    without --warmup (default 100) trains, and succeeds with status 0."""
    from rollout.cli import main

    with caplog.at_level("WARNING"):
        assert main(cli_convert(base_dir, jsonl_corpus, tmp_path / "out", "--steps", "2")) == 0
    assert "warming up over all 2 steps" in caplog.text
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["conversion"]["warmup"] == 2


def test_cli_convert_errors_are_one_line_without_a_traceback(base_dir, jsonl_corpus, tmp_path, capsys):
    from rollout.cli import main

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    for f in base_dir.iterdir():
        (gpt2 / f.name).write_bytes(f.read_bytes())
    config = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps(dict(config, model_type="gpt2", architectures=["GPT2LMHeadModel"])))
    for base, named in ((gpt2, "model_type 'gpt2' is not supported"), (tmp_path / "missing", "missing")):
        assert main(cli_convert(base, jsonl_corpus, tmp_path / "out", "--steps", "2")) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("rollout convert: error: ") and named in err[0], err
