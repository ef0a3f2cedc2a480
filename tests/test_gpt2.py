"""GPT-2 interoperability, proven against Hugging Face transformers (a dev dependency only).

A small random GPT-2 is built with transformers and saved as a Hugging Face directory; our loader
must compute the same logits, loss and greedy continuations, and our export must load back into
transformers (and into ours) unchanged."""

import dataclasses
import json
import os

import pytest
import tokenizers
import torch
import transformers
from safetensors.torch import load_file, save_file

from nanoforge import gpt2
from model import GPTConfig
from nanoforge.tokenizer import EOT
from conftest import TINY_TEXT, run_cli


VOCAB, POSITIONS = 1000, 128
TEXT = TINY_TEXT[:400] + " Hello world!  Ünïcödé 123 4567 it'll we've \n\n  tabs\tend 日本語"


def random_gpt2(vocab_size=VOCAB, seed=0):
    torch.manual_seed(seed)
    # initializer_range 0.1 (not 0.02) spreads the logits, so greedy decoding is no string of one token.
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=vocab_size, n_positions=POSITIONS,
                                     initializer_range=0.1, bos_token_id=None, eos_token_id=None)
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_bpe(directory):
    """A byte-level BPE trained by Hugging Face `tokenizers`, saved as GPT-2 saves its tokenizer
    (vocab.json + merges.txt, <|endoftext|> last). Returns the tokenizers.Tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([TINY_TEXT], trainer)
    tok.add_special_tokens([EOT])
    tok.model.save(str(directory))  # merges.txt (and vocab.json without the special token, rewritten next)
    (directory / "vocab.json").write_text(json.dumps(tok.get_vocab()), encoding="utf-8")
    return tok


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(transformers model, its saved directory with tokenizer files)."""
    directory = tmp_path_factory.mktemp("hf_gpt2")
    model = random_gpt2()
    model.save_pretrained(directory)
    tiny_bpe(directory)
    return model, directory


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (2, POSITIONS), generator=torch.Generator().manual_seed(1))


def test_logits_equal_transformers_at_full_and_cropped_block_size(hf, tokens):
    model, directory = hf
    ours = gpt2.from_pretrained(str(directory)).eval()
    assert ours.config.block_size == POSITIONS and ours.config.vocab_size == VOCAB
    with torch.no_grad():
        theirs = model(tokens).logits
        logits, _ = ours(tokens)  # every position of the full block_size
        assert (logits - theirs).abs().max() < 1e-5
        cropped = gpt2.from_pretrained(str(directory), block_size=32).eval()
        assert cropped.transformer.wpe.weight.shape == (32, 64)
        assert (cropped(tokens[:, :32])[0] - model(tokens[:, :32]).logits).abs().max() < 1e-5


def test_loss_equals_transformers(hf, tokens):
    """transformers shifts its labels inside (logit t predicts token t + 1); we pass targets already
    shifted, as train.py's batches are: the two must be the same number."""
    model, directory = hf
    ours = gpt2.from_pretrained(str(directory)).eval()
    with torch.no_grad():
        theirs = model(tokens, labels=tokens).loss
        _, loss = ours(tokens[:, :-1], tokens[:, 1:])
    assert abs(loss.item() - theirs.item()) < 1e-5


def test_greedy_generation_equals_transformers(hf, tokens):
    model, directory = hf
    ours = gpt2.from_pretrained(str(directory)).eval()
    prompt = tokens[:, :5]
    theirs = model.generate(prompt, do_sample=False, max_new_tokens=50, pad_token_id=0)
    assert theirs.shape == (2, 55)
    assert torch.equal(ours.generate(prompt, 50, temperature=0), theirs)


def test_export_loads_in_transformers_and_round_trips_bit_identically(hf, tokens, tmp_path):
    model, directory = hf
    ours = gpt2.from_pretrained(str(directory)).eval()
    gpt2.export(ours, str(tmp_path / "out"))
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert (back(tokens).logits - ours(tokens)[0]).abs().max() < 1e-5
    # HF -> ours -> HF: the same tensors, bit for bit
    original, exported = load_file(directory / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original)
    # ours -> HF -> ours
    again = gpt2.from_pretrained(str(tmp_path / "out"))
    assert ours.state_dict().keys() == again.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), again.state_dict().values()))


def test_overrides_dropout_and_vocab_padding(hf, tokens):
    model, directory = hf
    ours = gpt2.from_pretrained(str(directory), dropout=0.1, vocab_size=1024)
    assert (ours.config.dropout, ours.config.vocab_size, ours.config.n_layer) == (0.1, 1024, 2)
    wte = ours.transformer.wte.weight
    assert ours.lm_head.weight is wte
    assert torch.allclose(wte[VOCAB:], wte[:VOCAB].mean(dim=0).expand(24, -1))  # padding at the mean embedding
    with torch.no_grad():
        logits, _ = ours.eval()(tokens)
        assert (logits[..., :VOCAB] - model(tokens).logits).abs().max() < 1e-5


def test_pytorch_model_bin_with_old_names_is_read_with_weights_only(hf, tokens, tmp_path):
    """The hub's GPT-2 files predate the 'transformer.' prefix and carry the causal mask as a buffer."""
    model, directory = hf
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text((directory / "config.json").read_text())
    state = {k.removeprefix("transformer."): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, POSITIONS, POSITIONS))
    torch.save(state, old / "pytorch_model.bin")
    with torch.no_grad():
        assert (gpt2.from_pretrained(str(old)).eval()(tokens)[0] - model(tokens).logits).abs().max() < 1e-5

    # A .bin that holds more than tensors is refused before any of its code can run.
    marker = tmp_path / "marker"
    marker.write_text("still here")

    class Payload:
        def __reduce__(self):
            return os.remove, (str(marker),)

    torch.save({"wte.weight": Payload()}, old / "pytorch_model.bin")
    with pytest.raises(gpt2.GPT2Error, match="cannot read .*pytorch_model.bin' as plain tensors"):
        gpt2.from_pretrained(str(old))
    assert marker.exists()


def test_shape_mismatch_names_the_tensor(hf, tmp_path):
    model, directory = hf
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((directory / "config.json").read_text())
    tensors = load_file(directory / "model.safetensors")
    tensors["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(64, 128)
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(gpt2.GPT2Error, match=r"'transformer.h.1.mlp.c_fc.weight' .* shape \(64, 128\), but "
                                             r"config.json implies \(64, 256\)"):
        gpt2.from_pretrained(str(bad))
    with pytest.raises(gpt2.GPT2Error, match="block_size 256 is larger than this model's 128 positions"):
        gpt2.from_pretrained(str(directory), block_size=256)


def test_model_names_are_found_in_the_hf_cache_or_explained(hf, tmp_path, monkeypatch, data_dir):
    _, directory = hf
    for var, value in (("HF_HUB_CACHE", tmp_path / "hub"), ("HF_HOME", tmp_path / "home"),
                       ("XDG_CACHE_HOME", tmp_path / "xdg")):
        monkeypatch.setenv(var, str(value))
    with pytest.raises(gpt2.GPT2Error) as error:
        gpt2.locate("gpt2-medium")
    message = str(error.value)
    for where in (tmp_path / "hub" / "models--gpt2-medium", tmp_path / "home" / "hub" / "models--gpt2-medium",
                  tmp_path / "xdg" / "huggingface" / "hub" / "models--gpt2-medium"):
        assert str(where) in message
    assert "`huggingface-cli download gpt2-medium`" in message and "path" in message
    with pytest.raises(gpt2.GPT2Error, match="'gpt-2' is neither a GPT-2 model name"):
        gpt2.locate("gpt-2")

    # the cache's layout: models--NAME/refs/main names the revision under snapshots/
    repo = tmp_path / "home" / "hub" / "models--gpt2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots").mkdir()
    (repo / "snapshots" / "abc123").symlink_to(directory)
    assert gpt2.locate("gpt2") == str(repo / "snapshots" / "abc123")

    # train.py and sample.py say the same in one line and exit non-zero
    import sample
    import train

    for script, main, args in (
        ("train.py", train.main, ["--init_from=gpt2-xl", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'run'}",
                                   "--block_size=16"]),
        ("sample.py", sample.main, ["--init-from", "gpt2-xl"]),
    ):
        with pytest.raises(SystemExit) as exit:
            main(args)
        assert f"{script}: error: GPT-2 model 'gpt2-xl' is not available locally" in str(exit.value.code)
        assert "\n" not in str(exit.value.code)


def test_tokenizer_from_hf_files_encodes_like_transformers_and_exports_back(hf, tmp_path):
    _, directory = hf
    ours = gpt2.tokenizer_from_hf(str(directory))
    theirs = transformers.GPT2TokenizerFast.from_pretrained(directory)
    ids = ours.encode(TEXT)
    assert ids == theirs.encode(TEXT) and len(ids) < len(TEXT.encode()) / 2  # real merges happen
    assert ours.decode(ids) == TEXT
    assert ours.eot_id == theirs.convert_tokens_to_ids(EOT) == ours.vocab_size - 1

    # tokenizer.json alone gives the same tokenizer
    alone = tmp_path / "tokenizer_json"
    alone.mkdir()
    hf_tok = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(str(directory / "vocab.json"),
                                                                  str(directory / "merges.txt")))
    hf_tok.add_special_tokens([EOT])
    hf_tok.save(str(alone / "tokenizer.json"))
    assert gpt2.tokenizer_from_hf(str(alone)).to_dict() == ours.to_dict()

    # export writes vocab.json + merges.txt that transformers reads as the same tokenizer
    out = tmp_path / "out"
    out.mkdir()
    gpt2.write_tokenizer_files(ours, str(out), POSITIONS)
    assert transformers.GPT2TokenizerFast.from_pretrained(out).encode(TEXT) == ids
    assert json.loads((out / "vocab.json").read_text()) == json.loads((directory / "vocab.json").read_text())
    assert (out / "merges.txt").read_text() == (directory / "merges.txt").read_text()


def test_train_refuses_data_whose_vocabulary_exceeds_the_models(tmp_path):
    from nanoforge.config import TrainConfig
    from nanoforge.tokenizer import ByteTokenizer

    small = tmp_path / "small"
    random_gpt2(vocab_size=200).save_pretrained(small)
    cfg = TrainConfig(init_from=str(small), data_dir="unused")
    with pytest.raises(gpt2.GPT2Error, match="data's tokenizer has 257 tokens, more than .* vocabulary of 200"):
        gpt2.init_for_training(cfg, ByteTokenizer())


def test_finetune_sample_export_end_to_end(hf, tmp_path, corpus):
    """train.py from the HF directory (byte-level data: 257 ids fit the model's 1000), resume,
    sample.py from the checkpoint and from the HF directory, export.py, load with transformers."""
    from nanoforge import checkpoint
    from nanoforge.preparation import prepare
    from nanoforge.loading import load_model

    _, directory = hf
    data, run = tmp_path / "data", tmp_path / "run"
    prepare(str(corpus), "byte", str(data), 0.1)
    args = [f"--init_from={directory}", f"--data_dir={data}", f"--out_dir={run}", "--block_size=32",
            "--batch_size=2", "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--log_interval=1",
            "--vocab_multiple=64", "--learning_rate=3e-4", "--warmup_iters=0", "--device=cpu", "--dtype=float32"]
    result = run_cli("train.py", *args)
    assert result.returncode == 0, result.stderr
    assert "the weights set n_layer=2 (config had 12), n_head=4 (config had 12), n_embd=64 (config had 768)" in result.stderr
    assert "the data was not tokenized with" in result.stderr  # byte ids are not the BPE's
    info = checkpoint.load(str(run / "latest.safetensors")).info
    assert info["model"] == {**dataclasses.asdict(GPTConfig()), "block_size": 32, "vocab_size": 1024, "n_layer": 2,
                             "n_head": 4, "n_embd": 64, "dropout": 0.0, "bias": True}
    assert (info["config"]["n_layer"], info["config"]["n_embd"]) == (2, 64)

    # the run's config.json records the weights' values, so --resume alone continues it
    result = run_cli("train.py", f"--out_dir={run}", "--max_iters=3", "--resume")
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stderr and "n_layer changed" not in result.stderr

    result = run_cli("sample.py", "--ckpt", run, "--prompt", "First", "--num-samples", "1",
                     "--max-new-tokens", "20", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("First")
    result = run_cli("sample.py", "--init-from", directory, "--prompt", "Speak", "--num-samples", "1",
                     "--max-new-tokens", "20", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Speak")

    result = run_cli("export.py", "--ckpt", run, "--out", tmp_path / "hf_out")
    assert result.returncode == 0, result.stderr
    assert "no tokenizer files" in result.stderr  # byte-level data: not GPT-2's BPE
    result = run_cli("export.py", "--ckpt", run, "--out", tmp_path / "hf_out")
    assert result.returncode == 1 and "export.py: error: " in result.stderr and "is not empty" in result.stderr
    exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf_out").eval()
    ours, tokenizer = load_model(str(run), "cpu")
    assert exported.config.vocab_size == tokenizer.vocab_size == 257  # padding dropped
    x = torch.tensor([tokenizer.encode("First Citizen:")])
    with torch.no_grad():
        assert (exported(x).logits - ours(x)[0]).abs().max() < 1e-5


def test_export_writes_gpt2_tokenizer_files_from_a_checkpoint(hf, tmp_path):
    """The tokenizer travels with the export when it is GPT-2's BPE."""
    _, directory = hf
    model, tokenizer = gpt2.model_and_tokenizer(str(directory))
    gpt2.export(model, str(tmp_path / "out"), tokenizer)
    theirs = transformers.GPT2TokenizerFast.from_pretrained(tmp_path / "out")
    assert theirs.encode(TEXT) == tokenizer.encode(TEXT)
    assert theirs.eos_token == EOT
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == tokenizer.vocab_size == 334 and config["eos_token_id"] == 333
