"""features.py end to end on a tiny trained run: training writes an SAE file that says what made it and resumes to
the same weights; bad input is one line; show, page and explain --sae show the features (the pages in headless
Chromium); the embedding space's neighbours and map by hand; steering along a feature moves the next-token
distribution the way its direction's un-embedding says, in the library and through sample.py --steer."""

import contextlib
import io

import pytest
import torch
from torch.nn import functional as F

from conftest import TINY_TEXT, offline_page, tiny_config
from nanoforge import embedding_space, feature_survey, features, loading
from nanoforge.features import SAEConfig, Site, SparseAutoencoder

TRAIN = ["--site", "block1", "--expansion", "2", "--k", "4", "--contexts", "4", "--eval-every", "3",
         "--eval-batches", "1", "--save-every", "3", "--dead-after", "100"]


def run_main(module, *args):
    """A command's main() in this process (a subprocess would import torch again); returns its stdout."""
    script = __import__(module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        script.main([str(a) for a in args])
    return out.getvalue()


def prepared(root, kind):
    from nanoforge.preparation import prepare

    corpus = root / "corpus.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    prepare(str(corpus), kind, str(root / f"data_{kind}"), 0.1)
    return root / f"data_{kind}"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run directory, data directory): a tiny RMSNorm char model trained a few steps (RMSNorm without bias makes a
    large steering vector's logits exactly its direction's un-embedding: the steering test relies on it)."""
    from train import train

    root = tmp_path_factory.mktemp("features_run")
    data = prepared(root, "char")
    train(tiny_config(data, root / "run", max_iters=10, norm="rmsnorm", bias=False, tie_embeddings=False))
    return root / "run", data


@pytest.fixture(scope="module")
def sae_file(run, tmp_path_factory):
    ckpt, data = run
    out = tmp_path_factory.mktemp("sae") / "sae.safetensors"
    run_main("features", "train", "--ckpt", ckpt, "--data", data, *TRAIN, "--steps", "6", "--out", out)
    return out


def test_train_saves_what_made_it_and_resumes_to_the_same_weights(run, sae_file, tmp_path):
    ckpt, data = run
    saved = features.load(sae_file)
    info = saved.info
    assert info["site"] == {"kind": "block", "layer": 1} and info["sae"] == dict(n_embd=32, latents=64, k=4,
                                                                                 batch_topk=False)
    assert info["step"] == 6 and info["tokens"] == 6 * 4 * 15 and info["data"] == str(data.resolve())
    model, _ = loading.load_model(ckpt, "cpu")
    assert info["model_identity"] == features.model_identity(model)
    log = (sae_file.parent / "sae.log.jsonl").read_text().splitlines()
    assert len(log) == 2 and '"loss_recovered"' in log[0] and '"kl"' in log[0]

    half = tmp_path / "half.safetensors"
    run_main("features", "train", "--ckpt", ckpt, "--data", data, *TRAIN, "--steps", "3", "--out", half)
    out = run_main("features", "train", "--ckpt", ckpt, "--data", data, *TRAIN, "--steps", "6", "--out", half,
                   "--resume")
    assert "from step 3" in out and "step 6 | 360 tokens" in out and "loss recovered" in out
    resumed = features.load(half)
    for name, tensor in saved.sae.state_dict().items():
        assert torch.equal(resumed.sae.state_dict()[name], tensor), name


def test_bad_input_is_one_line(run, sae_file, tmp_path):
    ckpt, data = run
    byte_data = prepared(tmp_path, "byte")
    cases = [(["--site", "block9"], "--site block9: this model has blocks 0..1"),
             (["--site", "attn1"], "--site 'attn1' is not a site"),
             (["--site", "block1", "--k", "300"], "--k 300 must be between 1 and the number of latents \\(256"),
             (["--site", "block1", "--data", byte_data], ".* is tokenized with another tokenizer \\(byte"),
             (["--site", "block1", "--out", sae_file], ".* exists: pass --resume"),
             (["--site", "mlp1", "--out", sae_file, "--resume"], "--resume: .* holds an SAE of block1")]
    for extra, message in cases:
        args = ["train", "--ckpt", ckpt, "--data", data, "--steps", "1", *extra]
        with pytest.raises(SystemExit, match=f"^features.py: error: {message}"):
            run_main("features", *args)

    from train import train

    train(tiny_config(data, tmp_path / "other", max_iters=2, norm="rmsnorm", bias=False, tie_embeddings=False))
    with pytest.raises(SystemExit, match="^features.py: error: .* was trained on another model"):
        run_main("features", "show", "--ckpt", tmp_path / "other", "--data", data, "--sae", sae_file)
    with pytest.raises(SystemExit, match="^sample.py: error: .* was trained on another model"):
        run_main("sample", "--ckpt", tmp_path / "other", "--sae", sae_file, "--steer", "0=1", "--max-new-tokens", "2")
    with pytest.raises(SystemExit, match="^sample.py: error: --steer 99=1: this SAE has features 0..63"):
        run_main("sample", "--ckpt", ckpt, "--sae", sae_file, "--steer", "99=1", "--max-new-tokens", "2")
    with pytest.raises(SystemExit, match="^features.py: error: .* is a model checkpoint, not an SAE file"):
        run_main("features", "show", "--ckpt", ckpt, "--data", data, "--sae", ckpt / "latest.safetensors")


def test_show_lists_features_and_one_in_full(run, sae_file):
    ckpt, data = run
    out = run_main("features", "show", "--ckpt", ckpt, "--data", data, "--sae", sae_file, "--tokens", "2000")
    assert "64 features of block1" in out and "Most often active first" in out and "density" in out
    feature = int(out.split("\nF")[1].split()[0])  # the densest
    one = run_main("features", "show", "--ckpt", ckpt, "--data", data, "--sae", sae_file, "--feature", feature)
    assert "top-activating contexts" in one and "[" in one and "promotes:" in one and "suppresses:" in one


def test_survey_counts_by_hand():
    """Three tokens, two active latents each: density, peak, histogram and the top contexts from the sparse codes."""
    model = GPT_tiny()
    sae = SparseAutoencoder(SAEConfig(32, 4, 2))
    windows = torch.tensor([[5, 6, 7, 8]])  # position 0 left out: tokens 6, 7, 8 surveyed
    values = torch.tensor([[2.0, 1.0], [4.0, 0.0], [1.0, 0.5]])
    indices = torch.tensor([[0, 1], [0, 2], [1, 0]])
    s = feature_survey.summarise(sae, model, windows, values, indices, [str(i) for i in range(40)])
    assert s.density.tolist() == pytest.approx([1.0, 2 / 3, 0.0, 0.0]) and s.dead_count() == 2 and s.by_density() == [0, 1]
    assert s.peak.tolist() == [4.0, 1.0, 0.0, 0.0]
    assert [n for _, n in s.top[0]] == [1, 0, 2] and s.top[0][0][0] == 4.0
    assert s.histogram[0].sum() == 3 and s.histogram[0, -1] == 1  # 4.0 is in the last bin
    tokens, at = s.context(1, 0)
    assert tokens == [("6", 2.0), ("7", 4.0), ("8", 0.5)] and at == 1


def GPT_tiny():
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=32, bias=False))


def test_embedding_neighbours_and_pca_by_hand():
    matrix = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    near = embedding_space.neighbours(matrix, 0, 3)
    assert [i for i, _ in near] == [1, 2, 3]
    assert near[0][1] == pytest.approx(0.9 / (0.81 + 0.01) ** 0.5) and near[2][1] == pytest.approx(-1)
    line = torch.tensor([[0.0, 0.0], [1.0, 2.0], [2.0, 4.0], [3.0, 6.0]])  # all on one line: PC2 is zero
    points = embedding_space.pca_2d(line)
    assert points[:, 1].abs().max() < 1e-5
    assert points[:, 0].abs().tolist() == pytest.approx([1.5 * 5**0.5, 0.5 * 5**0.5, 0.5 * 5**0.5, 1.5 * 5**0.5])


def test_embedding_command_prints_neighbours_and_a_map(run):
    ckpt, _ = run
    out = run_main("features", "embedding", "--ckpt", ckpt, "--token", "e", "--neighbours", "3")
    assert out.startswith("embedding    'e': ") and "unembedding  'e': " in out and "embedding map (PCA" in out
    with pytest.raises(SystemExit, match="^features.py: error: --token 'ee' is 2 tokens"):
        run_main("features", "embedding", "--ckpt", ckpt, "--token", "ee")


def steering_sae(model, direction):
    """An SAE of the model's last block whose feature 0's decoder direction is `direction`."""
    sae = SparseAutoencoder(SAEConfig(model.config.n_embd, 4, 1))
    with torch.no_grad():
        sae.W_dec[0] = F.normalize(direction, dim=0)
    return sae


def test_steering_moves_the_distribution_the_way_the_unembedding_says(run, tmp_path):
    ckpt, data = run
    model, tokenizer = loading.load_model(ckpt, "cpu")
    site = Site("block", model.config.n_layer - 1)
    direction = torch.randn(model.config.n_embd, generator=torch.Generator().manual_seed(3))
    sae = steering_sae(model, direction)
    effect = feature_survey.logit_effects(model, sae)[0]  # what the direction says, through the un-embedding
    promoted = effect.argmax().item()
    idx = torch.tensor([tokenizer.encode("First Citizen")])
    with torch.no_grad():
        clean = model(idx)[0][0, -1].log_softmax(-1)
        size = features.site_activations(model, idx, site)[0, -1].norm().item()  # the residual stream's
        agreement = []
        for scale in (size, 4 * size, 100 * size):
            handle = features.steer(model, site, sae, [(0, scale)])
            steered = model(idx)[0][0, -1].log_softmax(-1)
            handle.remove()
            agreement.append(F.cosine_similarity(steered - steered.mean(), effect - effect.mean(), dim=0).item())
            assert steered[promoted] > clean[promoted]
    # the further along the direction, the more the log-probabilities are its un-embedding's logits (up to a constant)
    assert agreement[0] < agreement[1] < agreement[2] and agreement[2] > 0.99, agreement
    assert steered.argmax() == promoted
    assert torch.equal(model(idx)[0][0, -1].log_softmax(-1), clean)  # the hook is gone

    path = tmp_path / "steer.safetensors"
    features.save(path, sae, dict(site={"kind": "block", "layer": site.layer}, model=str(ckpt), step=0, tokens=0,
                                  model_identity=features.model_identity(model), data=str(data)))
    out = run_main("sample", "--ckpt", ckpt, "--prompt", "First", "--sae", path, "--steer", "0=200", "--temperature",
                   "0", "--num-samples", "1", "--max-new-tokens", "6", "--no-stream")
    assert out.startswith("First" + tokenizer.decode([promoted]) * 6)
    plain = run_main("sample", "--ckpt", ckpt, "--prompt", "First", "--temperature", "0", "--num-samples", "1",
                     "--max-new-tokens", "6", "--no-stream")
    assert plain != out


def test_explain_shows_features_and_ablates_one(run, sae_file, tmp_path):
    ckpt, _ = run
    out = run_main("explain", "--ckpt", ckpt, "--prompt", "First Cit", "--sae", sae_file, "--ablate-feature", "0",
                   "--html", tmp_path / "e.html")
    assert "SAE features of block1 active at each token" in out and "   0 'F'" in out
    assert "feature 0 ablated at block1: loss over the prompt" in out and "it now predicts" in out
    with pytest.raises(SystemExit, match="^explain.py: error: --ablate-feature needs --sae"):
        run_main("explain", "--ckpt", ckpt, "--prompt", "First", "--ablate-feature", "0")


def test_pages_work_in_headless_chromium(run, sae_file, tmp_path, chromium_path):
    ckpt, data = run
    page_path = tmp_path / "features.html"
    run_main("features", "page", "--ckpt", ckpt, "--data", data, "--sae", sae_file, "--tokens", "2000",
             "--out", page_path)
    explain_path = tmp_path / "explain.html"
    run_main("explain", "--ckpt", ckpt, "--prompt", "First Cit", "--sae", sae_file, "--html", explain_path)
    saved = features.load(sae_file)
    errors = []
    with offline_page(chromium_path, errors) as page:
        page.goto(page_path.as_uri())
        rows = page.locator("#features tr")
        assert rows.count() > 1
        second = rows.nth(1)
        feature = second.get_attribute("data-feature")
        second.click()
        assert page.locator("#feature").get_attribute("data-feature") == feature
        assert page.locator("#feature-title").inner_text() == f"Feature {feature}"
        assert page.locator("#contexts .ctx").count() >= 1 and page.locator("#contexts .at").count() >= 1
        assert page.locator("#promoted").inner_text().count("'") == 2 * feature_survey.LOGIT_TOKENS
        page.locator("#search").fill("zzzz-nowhere")
        assert page.locator("#features tr:not([hidden])").count() == 0
        assert page.locator("#matches").inner_text() == "0 features match"
        page.locator("#search").fill("citizen")
        visible = page.locator("#features tr:not([hidden])").count()
        assert 0 < visible <= rows.count()
        page.locator("#search").fill("")
        assert page.locator("#features tr:not([hidden])").count() == rows.count()
        box = page.locator("#map").bounding_box()
        page.locator("#map").click(position={"x": box["width"] / 2, "y": box["height"] / 2})
        assert "nearest" in page.locator("#picked").inner_text()
        assert page.locator("#near").inner_text().count("\n") == 9  # ten neighbours

        page.goto(explain_path.as_uri())
        assert page.locator("#features-view").is_visible()
        cells = page.locator("#features tr td:nth-child(3)").all_inner_texts()
        assert len(cells) == len("First Cit") and all(c.startswith("F") for c in cells)
    assert errors == []
    assert saved.sae.cfg.latents == 64
