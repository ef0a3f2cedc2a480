"""interventions.py and explain.py's causal views: ablation equals editing the weights by hand, the direct logit
attribution's parts sum to the logit for every architecture option, activation patching restores all or nothing
where it must, head importance finds the head a task was made to need, and the views work from the command line
(text, JSON, PNG, the offline page in headless Chromium) for a char model, a chat model and GPT-2."""

import copy
import json

import pytest
import torch

from conftest import run_cli
from model import GPT, GPTConfig
from nanoforge import interventions as iv
from nanoforge.interventions import Part
from test_architecture import OPTIONS
from conftest import find_chromium
from test_explain import explain_main, trained_run

ALL_OPTIONS = {"gpt2": {}, **OPTIONS, "no-bias": dict(bias=False), "swiglu+gqa+untied": dict(
    mlp="swiglu", n_kv_head=2, tie_embeddings=False)}
VOCAB = 40


def small_model(options, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=16, vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=64, **options)).eval()
    with torch.no_grad():  # larger weights than the init's: every part makes a visible difference
        for p in model.parameters():
            p.mul_(5) if p.dim() == 2 else p.add_(0.1 * torch.randn_like(p))
    return model


def prompt(seed=1, T=12):
    return torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ALL_OPTIONS)
def test_ablating_nothing_reproduces_the_logits_exactly(name):
    model, idx = small_model(ALL_OPTIONS[name]), prompt()
    logits, _ = model(idx)
    cfg = model.config
    every_part = iv.all_heads(cfg) + [Part(k, l) for k in ("attn", "mlp") for l in range(cfg.n_layer)]
    with iv.intervene(model, {part: (lambda a: a) for part in every_part}):  # hooks that change nothing
        hooked, _ = model(idx)
    assert torch.equal(hooked, logits)
    result = iv.ablate(model, idx, [])
    assert result.ablated_loss == result.loss and result.ablated_p == result.p


def by_hand(model, layer, head=None, mean=None):
    """A copy of model with one head's columns of attn.c_proj zeroed (its slice of the attention output
    removed), their mean output added to c_proj's bias instead for mean ablation; head None: the whole layer."""
    edited = copy.deepcopy(model)
    proj = edited.transformer.h[layer].attn.c_proj
    d = proj.in_features // model.config.n_head
    columns = slice(None) if head is None else slice(head * d, (head + 1) * d)
    with torch.no_grad():
        if mean is not None:
            shift = proj.weight[:, columns] @ mean
            if proj.bias is None:
                proj.bias = torch.nn.Parameter(shift)
            else:
                proj.bias += shift
        proj.weight[:, columns] = 0
        if head is None:
            proj.bias.zero_()
    return edited


@pytest.mark.parametrize("name", ["gpt2", "all", "mqa+rope", "swiglu+gqa+untied"])
def test_ablating_a_head_equals_editing_its_slice_by_hand(name):
    model, idx = small_model(ALL_OPTIONS[name]), prompt()
    for layer, head in [(0, 1), (1, 3)]:
        zeroed, _ = by_hand(model, layer, head)(idx)
        with iv.intervene(model, iv.ablations([Part("head", layer, head)], "zero")):
            ablated, _ = model(idx)
        torch.testing.assert_close(ablated, zeroed, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(ablated, model(idx)[0], atol=1e-3)  # the head mattered
        # mean ablation: the head's output replaced at each position t by its mean at t over reference windows
        reference = torch.randint(0, VOCAB, (20, 16), generator=torch.Generator().manual_seed(7))
        heads_in = []
        hook = model.transformer.h[layer].attn.c_proj.register_forward_pre_hook(lambda m, a: heads_in.append(a[0]))
        for window in reference:  # one at a time, summed in float64: a different path from the library's
            model(window[None])
        hook.remove()
        d = 64 // 4
        mean = torch.stack([h[0, :, head * d : (head + 1) * d] for h in heads_in]).double().mean(0).float()  # (16, d)
        edited = by_hand(model, layer, head)  # the head's columns zeroed, then its mean's image added per position
        proj = edited.transformer.h[layer].attn.c_proj
        shift = (model.transformer.h[layer].attn.c_proj.weight[:, head * d : (head + 1) * d].detach()
                 @ mean[: idx.size(1)].T).T  # (T, n_embd)
        proj.register_forward_hook(lambda m, a, out: out + shift)
        expected, _ = edited(idx)
        means = iv.mean_activations(model, reference, [Part("head", layer, head)])
        assert means[Part("head", layer, head)].shape == (1, 16, d)
        result = iv.ablate(model, idx, [Part("head", layer, head)], "mean", means)
        torch.testing.assert_close(torch.tensor(result.ablated_loss),
                                   torch.nn.functional.cross_entropy(expected[0, :-1], idx[0, 1:]), rtol=1e-5, atol=1e-5)


def test_mean_ablation_keeps_nothing_of_the_ablated_prompt():
    """The replacement comes from the reference set alone: two prompts that differ only before position t get
    the same ablated head output from t on (a mean over the prompt itself, as before, kept 1/T of it)."""
    model = small_model({})
    reference = torch.randint(0, VOCAB, (16, 16), generator=torch.Generator().manual_seed(3))
    part = Part("head", 1, 2)
    means = iv.mean_activations(model, reference, [part])
    outputs = []
    for idx in (prompt(1), prompt(2)):
        with iv.intervene(model, iv.ablations([part], "mean", means)):
            _, seen = iv.record(model, idx, [Part("head", 1, 2)])
        outputs.append(seen)
    with pytest.raises(iv.InterventionError, match="mean ablation needs a reference set"):
        iv.ablations([part], "mean")
    # the hook order: record's hook sees the activation after the ablation's edit
    torch.testing.assert_close(outputs[0][part], outputs[1][part])
    torch.testing.assert_close(outputs[0][part], means[part][:, :12])


def test_ablating_a_whole_attention_layer_or_mlp_removes_its_output():
    model, idx = small_model({}), prompt()
    for part, edit in [(Part("attn", 1), lambda m: by_hand(m, 1)), (Part("mlp", 0), None)]:
        if edit is None:
            expected_model = copy.deepcopy(model)
            with torch.no_grad():
                expected_model.transformer.h[0].mlp.c_proj.weight.zero_()
                expected_model.transformer.h[0].mlp.c_proj.bias.zero_()
        else:
            expected_model = edit(model)
        with iv.intervene(model, iv.ablations([part], "zero")):
            ablated, _ = model(idx)
        torch.testing.assert_close(ablated, expected_model(idx)[0], rtol=1e-5, atol=1e-5)


def test_ablation_specs_parse_and_are_checked_against_the_model():
    assert iv.parse_parts("1.2, attn0,mlp3") == [Part("head", 1, 2), Part("attn", 0), Part("mlp", 3)]
    assert [str(p) for p in iv.parse_parts("1.2,attn0,mlp3")] == ["1.2", "attn0", "mlp3"]
    for bad in ("1", "head1", "1.2.3", "attn", ""):
        with pytest.raises(iv.InterventionError, match="is not a part: write a head as LAYER.HEAD"):
            iv.parse_parts(bad)
    with pytest.raises(iv.InterventionError, match="layers 0..1 and heads 0..3; there is no '1.4'"):
        iv.check_parts(iv.parse_parts("1.4"), small_model({}).config)


@pytest.mark.parametrize("name", ALL_OPTIONS)
def test_attribution_parts_sum_to_the_logit(name):
    model, idx = small_model(ALL_OPTIONS[name]), prompt()
    logits, _ = model(idx)
    cfg = model.config
    for position, token in [(11, 3), (4, int(logits[0, 4].argmax()))]:
        result = iv.attribute(model, idx, position, token)
        assert result.logit == logits[0, position, token].item()
        total = sum(value for _, value in result.parts)
        assert total == pytest.approx(result.logit, rel=1e-4, abs=1e-4)
        names = [n for n, _ in result.parts]
        biased = cfg.bias
        assert len(names) == 1 + cfg.n_layer * (cfg.n_head + biased + 1) + (biased and cfg.norm == "layernorm")
        assert names[:3] == ["embeddings", "0.0", "0.1"] and f"mlp{cfg.n_layer - 1}" in names
    # a head whose output projection is zero writes nothing towards any logit
    silent = by_hand(model, 1, 2)
    assert dict(iv.attribute(silent, idx, 11, 3).parts)["1.2"] == 0


def test_patching_the_whole_clean_stream_restores_all_and_nothing_restores_nothing():
    model = small_model(ALL_OPTIONS["all"])
    clean, corrupted = prompt(), prompt()
    corrupted[0, 5] = (corrupted[0, 5] + 1) % VOCAB
    answer = int(model(clean)[0][0, -1].argmax())
    result = iv.patch(model, clean, corrupted, answer)
    clean_logits, seen = iv.record(model, clean, [Part("resid", 2)])
    args = (answer, result.clean_logit, result.corrupted_logit)
    assert iv.restored(model, corrupted, {Part("resid", 2): iv.patched(seen[Part("resid", 2)])}, *args) == 1.0
    assert iv.restored(model, corrupted, {}, *args) == 0.0
    assert result.streams.shape == (3, 12) and result.heads.shape == (2, 4)
    assert result.streams[2, -1] == pytest.approx(1.0)  # the last stream at the last position is the output
    assert result.streams[2, :-1].abs().max() < 1e-5  # other positions of it are never read again
    assert result.streams[0, 5] == pytest.approx(1.0)  # the one token that differs: the whole difference
    assert result.streams[0, :5].abs().max() < 1e-5  # identical tokens: nothing to patch
    # linear in the end: the parts of one step need not sum to 1, but some head carries part of it
    assert result.heads.abs().max() > 0.01


def previous_token_model():
    """A 2-layer, 2-head model trained on sequences where every token repeats the one two back (a b a b ...),
    with every head's output projection held at zero but head 1.1's: only that head can carry the earlier
    token forward, so it is the one head the model needs."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=12, n_layer=2, n_head=2, n_embd=32, pos_emb="rope"))
    mask = {layer: torch.ones(32, 32) for layer in (0, 1)}
    mask[0][:] = 0
    mask[1][:, :16] = 0  # head 1.0's columns
    with torch.no_grad():
        for layer in (0, 1):
            proj = model.transformer.h[layer].attn.c_proj.weight
            proj.mul_(mask[layer])
            proj.register_hook(lambda grad, m=mask[layer]: grad * m)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=0.0)
    for step in range(60):
        x = alternating(16, step)
        _, loss = model(x[:, :-1], x[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def alternating(batch, seed):
    pairs = torch.randint(0, 12, (batch, 2), generator=torch.Generator().manual_seed(seed))
    return pairs.repeat(1, 9)[:, :17]  # (batch, 17): a b a b ...


def test_head_importance_ranks_the_head_the_task_needs_first():
    model = previous_token_model()
    batches = [(x[:, :-1], x[:, 1:]) for x in (alternating(32, 10_000 + i) for i in range(2))]
    reference = alternating(64, 20_000)[:, :-1]  # other sequences of the task: the mean ablation's reference
    means = iv.mean_activations(model, reference, iv.all_heads(model.config))
    for mode in ("zero", "mean"):
        base, increase = iv.head_importance(model, batches, mode, means)
        assert base < 1.0  # it learned the task: the first two tokens are guesses (ln 12 = 2.5 each), the rest known
        assert increase.shape == (2, 2)
        assert increase[1, 1] > 1.0
        others = increase.flatten()[:3]  # 0.0, 0.1, 1.0: their outputs never reach the stream
        assert others.abs().max() < 1e-4


# ----------------------------------------------------------------------------- from the command line

@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    return trained_run(tmp_path_factory, "char", 16)


def json_main(*args):
    return json.loads(explain_main(*args, "--json"))


def test_json_of_each_view(char_run):
    run = ("--ckpt", char_run, "--prompt", "Before we pr")
    ablated = json_main(*run, "--ablate", "1.0,mlp0")
    assert ablated["ablate"] == "1.0,mlp0" and ablated["ablation"] == "zero"
    assert ablated["ablated_loss"] != ablated["loss"] and len(ablated["positions"]) == 11
    assert ablated["positions"][0]["token"] == "B" and ablated["positions"][0]["next"] == "e"
    mean = json_main(*run, "--ablate", "1.0", "--ablation", "mean", "--data", char_run.parent / "data")
    assert mean["ablation"] == "mean" and mean["ablated_loss"] != ablated["loss"]
    attribution = json_main(*run, "--attribute", "o", "--position", "3")
    assert attribution["token"] == "o" and attribution["position"] == 3
    assert sum(p["value"] for p in attribution["parts"]) == pytest.approx(attribution["logit"], abs=1e-4)
    default = json_main(*run, "--attribute", "--position", "0")
    assert default["token"] == "e"  # the actual next token
    patched = json_main(*run, "--patch", "Before me pr")
    assert len(patched["residual"]) == 3 and len(patched["residual"][0]) == 12
    assert patched["residual"][-1][-1] == pytest.approx(1.0) and patched["tokens"][7] != patched["corrupted_tokens"][7]
    importance = json_main(*run, "--importance", char_run.parent / "data", "--batches", "2")
    assert importance["batches"] == 2 and len(importance["increase"]) == 2 and len(importance["increase"][0]) == 2
    alone = json_main("--ckpt", char_run, "--importance", char_run.parent / "data", "--batches", "2")
    assert alone == importance  # --importance uses no prompt, and needs none
    plain = json_main(*run)
    assert plain["tokens"][0] == "B" and len(plain["predictions"]) == 12


def test_terminal_views_and_importance_png(char_run, tmp_path):
    r = run_cli("explain.py", "--ckpt", char_run, "--prompt", "Before we pr", "--ablate", "0.1",
                "--importance", char_run.parent / "data", "--batches", "1", "--attribute", "--patch",
                "Before me pr", "--png", tmp_path / "png")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "ablation (zero) of 0.1: probability of the actual next token" in out and "loss over the prompt: " in out
    assert "head importance: rise in validation loss" in out and "the head that matters most: " in out
    assert "direct logit attribution of" in out and "the parts sum to the logit" in out
    assert "activation patching of the logit of" in out and "after block 1" in out
    assert (tmp_path / "png" / "importance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_causal_arguments_are_one_line_errors(char_run):
    run = ("--ckpt", char_run, "--prompt", "First")
    missing = ("--ckpt", char_run.parent / "no-such-run", "--prompt", "First")
    for args, message in [
        ((*missing, "--ablate", "1,2"), "--ablate: '1' is not a part"),
        (missing[:2], "--prompt is required \\(only --importance DATA_DIR runs without one\\)"),
        ((*missing[:2], "--importance", "d", "--attribute"), "--prompt is required"),
        ((*missing, "--ablation", "zero"), "--ablation goes with --ablate or --importance"),
        ((*missing, "--ablate", "1.0", "--ablation", "mean"), "--ablation mean replaces a part's output by its mean"),
        ((*missing, "--ablate", "1.0", "--data", "d"), "--data goes with --ablation mean"),
        ((*missing, "--position", "1"), "--position goes with --attribute"),
        ((*missing, "--attribute", "--ablate", "0.0", "--json"), "--json prints one view at a time"),
        ((*run, "--ablate", "2.0"), "--ablate: this model has layers 0..1 and heads 0..1; there is no '2.0'"),
        ((*run, "--patch", "Fir"), "--patch's prompt is 3 tokens and --prompt 5"),
        ((*run, "--patch", "Firsu", "--answer", "ee"), "--answer 'ee' is 2 tokens"),
        ((*run, "--attribute", "--position", "5"), "--position 5 is outside the prompt's 5 tokens"),
        ((*run, "--importance", char_run / "nothing"), "data directory .* does not exist"),
    ]:
        with pytest.raises(SystemExit, match=f"^explain.py: error: {message}"):
            explain_main(*args)


def test_chat_model_and_gpt2_views(chat_ckpt, tmp_path):
    from test_gpt2 import random_gpt2, tiny_bpe

    directory = tmp_path / "hf"
    random_gpt2(vocab_size=401).save_pretrained(directory)
    tiny_bpe(directory)
    for source, text, corrupted in [(("--ckpt", chat_ckpt), "add 2 3", "add 2 4"),
                                    (("--init-from", directory), "Speak, speak.", "Speak, hear.")]:
        attribution = json_main(*source, "--prompt", text, "--attribute")
        assert sum(p["value"] for p in attribution["parts"]) == pytest.approx(attribution["logit"], abs=1e-4)
        patched = json_main(*source, "--prompt", text, "--patch", corrupted)
        assert patched["residual"][-1][-1] == pytest.approx(1.0)
        assert "ablated_loss" in json_main(*source, "--prompt", text, "--ablate", "0.1,attn0")


def test_page_shows_the_causal_views_in_headless_chromium(char_run, tmp_path):
    from playwright.sync_api import sync_playwright

    page_path = tmp_path / "page.html"
    explain_main("--ckpt", char_run, "--prompt", "Before we pr", "--ablate", "0.1", "--importance",
                 char_run.parent / "data", "--batches", "1", "--attribute", "--patch", "Before me pr",
                 "--html", page_path)
    html = page_path.read_text(encoding="utf-8")
    assert "//" not in html and html.count("<script") == 2
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=find_chromium(), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("request", lambda r: errors.append("request " + r.url) if not r.url.startswith("file:") else None)
            page.goto(page_path.as_uri())
            for view in ("ablate", "importance", "attribute", "patch"):
                assert page.locator(f"#{view}-view").is_visible(), view
            assert page.locator("#ablate tr").count() == 1 + 11
            assert page.locator("#importance tr").count() == 1 + 2
            assert page.locator("#attribute tr").count() == 1 + 2 * (2 + 1 + 1) + 1  # embeddings; heads, bias, MLP; ln_f bias
            assert page.locator("#patch-residual tr").count() == 1 + 3
            assert page.locator("#patch-heads tr").count() == 1 + 2
            assert "loss over the prompt" in page.locator("#ablate-summary").inner_text()
        finally:
            browser.close()
    assert errors == []
    plain = tmp_path / "plain.html"
    explain_main("--ckpt", char_run, "--prompt", "First", "--html", plain)
    assert '"views":{}' in plain.read_text(encoding="utf-8")  # no view asked: its sections stay hidden
