"""The paper's analyses (snnadv analyze ...) and snnadv report, end to end on the CPU.

Tiny settings throughout (tiny arch, T in {4, 8}, 64 fine-tuning images, 20 test
images), so the accuracies are noise; what is checked is that every analysis runs
from the command line and writes JSON + CSV + PNG, that the sweeps resume exactly
(nothing recomputed, only changed settings recomputed, Ctrl-C loses at most the
setting in progress), and the numbers that theory fixes: Eq. 7 against the
simulated LIF neuron, the encoder's 2^b-level staircase and its shrinking averaging
error, and ReLU passing a perturbation of non-negative inputs unchanged.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from snnadv.cli.main import main

SWEEP = ["--epochs", "1", "--train-subset", "64", "--test-subset", "20", "--batch-size", "64"]


def _base(shared_data):
    return ["--data-dir", str(shared_data), "--device", "cpu", "--quiet"]


def _load(out: Path, name: str) -> dict:
    for ext in ("json", "csv", "png"):
        f = out / f"{name}.{ext}"
        assert f.is_file() and f.stat().st_size > 0, f"missing {f}"
    assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    return json.loads((out / f"{name}.json").read_text())


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def chain(shared_data, tmp_path_factory):
    """Tiny ANN (seed 0) -> SNN-conv, and a separately trained ANN-II (seed 1) as attack source."""
    from snnadv.config import resolve
    from snnadv.convert import convert
    from snnadv.train import train_ann

    root = tmp_path_factory.mktemp("analysis-chain")
    common = dict(data_dir=str(shared_data), device="cpu", quiet=True, batch_size=64)
    for seed, name in ((0, "ann"), (1, "ann_ii")):
        train_ann(resolve("train-ann", flags=dict(common, arch="tiny", epochs=1, lr=0.05, seed=seed,
                                                  train_subset=512, test_subset=20, out=str(root / f"{name}.pt"))))
    convert(resolve("convert", flags=dict(common, checkpoint=str(root / "ann.pt"), timesteps=16, percentile=99.9,
                                          curve=[16], test_subset=20, out=str(root / "conv.pt"))))
    return {"root": root, "ann": root / "ann.pt", "ann_ii": root / "ann_ii.pt", "conv": root / "conv.pt"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One run directory holding every analysis (what `snnadv report` is pointed at)."""
    return tmp_path_factory.mktemp("runs")


def _sweep_args(shared_data, chain, name, out, *extra):
    return (["analyze", name] + _base(shared_data) + SWEEP
            + ["--checkpoint", str(chain["conv"]), "--source-ckpt", str(chain["ann_ii"]), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def timesteps_run(shared_data, chain, runs):
    out = runs / "timesteps"
    assert main(_sweep_args(shared_data, chain, "timesteps", out, "--timesteps", "4,8", "--bits", "2,4")) == 0
    return out


@pytest.fixture(scope="module")
def leak_run(shared_data, chain, runs):
    out = runs / "leak"
    assert main(_sweep_args(shared_data, chain, "leak", out, "--leaks", "1.0,0.95", "--timesteps", "4")) == 0
    return out


@pytest.fixture(scope="module")
def eq7_run(runs):
    out = runs / "eq7"
    assert main(["analyze", "eq7", "--quiet", "--points", "30", "--sim-steps", "600", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def encoder_run(runs):
    out = runs / "encoder"
    assert main(["analyze", "encoder", "--quiet", "--bits", "2,4", "--timesteps", "4,16,64,256", "--points", "401",
                 "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def perturbation_run(shared_data, chain, runs):
    out = runs / "perturbation"
    assert main(["analyze", "perturbation"] + _base(shared_data)
                + ["--checkpoint", str(chain["ann"]), "--attack", "fgsm", "--test-subset", "20",
                   "--out", str(out)]) == 0
    return out


# --------------------------------------------------------------------------- Eq. 7
def test_eq7_closed_form_matches_simulated_lif(eq7_run, observed):
    r = _load(eq7_run, "eq7")
    c = r["checks"]
    assert c["compared"] > 50
    assert c["interval_equals_floor_n_plus_1"] and c["count_equals_floor_N_over_k"], c["interval_mismatches"]
    assert c["within_discretisation"] and c["never_fire_agree"] and c["never_fire_eq7"] > 0
    steps = r["settings"]["sim_steps"]
    for row in r["rows"]:
        k, n = row["interval_expected"], row["n_eq7"]
        if k is None:  # Eq. 7: never reaches the threshold; the neuron is silent
            assert row["rate_eq7"] == 0.0 and row["count_sim"] == 0
            continue
        assert n <= k < n + 1 + 1e-9  # the step grid: rate 1/k* is Eq. 7's 1/n rounded down
        if k <= steps and not row["tie"]:
            assert row["interval_sim"] == k  # exactly 1/ceil(n)
            assert row["rate_sim_interval"] == pytest.approx(1.0 / math.ceil(n))
            assert row["rate_sim_interval"] <= row["rate_eq7"] + 1e-12
        assert row["count_sim"] == steps // k or row["tie"]
    observed(f"Eq. 7 vs simulated LIF (hard reset, {steps} steps): {c['compared']} (ratio, leak) points, interval "
             f"= floor(n)+1 everywhere, k*-n in [{c['min_interval_minus_n']:.3f}, {c['max_interval_minus_n']:.3f}], "
             f"max |rate_eq7 - 1/k*| = {c['max_abs_rate_error']:.3f}")


def test_eq7_library_non_tie_points():
    from snnadv.analysis.eq7 import expected_interval, simulate
    from snnadv.neurons import eq7_spike_rate

    for lam, ratio in ((0.99, 0.3), (0.95, 0.12), (0.8, 0.5), (0.9999, 0.07)):
        k, tie = expected_interval(lam, ratio)
        sim = simulate(lam, [ratio], 400)[0]
        assert not tie and sim["interval"] == k == math.ceil(1.0 / eq7_spike_rate(lam, ratio))
    assert simulate(0.8, [0.1], 300)[0]["count"] == 0 and eq7_spike_rate(0.8, 0.1) == 0.0


# --------------------------------------------------------------------------- encoder
def test_encoder_staircase_and_averaging(encoder_run, observed):
    from snnadv.encoding import quantize

    r = _load(encoder_run, "encoder")
    assert all(v is True for k, v in r["checks"].items() if isinstance(v, bool)), r["checks"]
    x = torch.tensor(r["x"])
    for b in (2, 4):
        assert torch.unique(quantize(x, b)).numel() == 2 ** b
        rows = sorted((s for s in r["summary"] if s["bits"] == str(b)), key=lambda s: s["timesteps"])
        assert [s["levels_quantised"] for s in rows] == [2 ** b] * len(rows)
        errs = [s["err_vs_quantised"] for s in rows]
        assert all(e2 < e1 for e1, e2 in zip(errs, errs[1:])), errs
        for s in rows:  # the measured error is the binomial expectation, up to sampling noise
            assert s["err_vs_quantised"] == pytest.approx(s["err_expected"], rel=0.25)
            y = torch.tensor(r["curves"][f"{b}/{s['timesteps']}"])
            assert torch.allclose(y * s["timesteps"], (y * s["timesteps"]).round(), atol=1e-4)  # on the k/T grid
        observed(f"encoder {b}-bit: {2 ** b} levels; mean |y - x_quant| for T="
                 f"{[s['timesteps'] for s in rows]}: {[round(e, 4) for e in errs]} "
                 f"(expected {[round(s['err_expected'], 4) for s in rows]})")
    csv_lines = (encoder_run / "encoder.csv").read_text().splitlines()
    assert csv_lines[0] == "bits,timesteps,x,x_quant,y" and len(csv_lines) == 1 + 2 * 4 * 401


# --------------------------------------------------------------------------- perturbation
def test_perturbation_relu_passes_lif_reduces(perturbation_run, shared_data, tmp_path, observed):
    r = _load(perturbation_run, "perturbation")
    l2, c = r["l2"], r["checks"]
    assert c["inputs_non_negative"] and c["relu_l2_equals_input_l2"] and c["lif_l2_le_input_l2"]
    assert l2["relu"] == pytest.approx(l2["input"], abs=1e-6)
    assert 0 < l2["lif"] <= l2["input"]
    assert r["linf"]["input"] <= 8 / 255 + 1e-6 and r["settings"]["attack"] == "fgsm"
    assert r["inputs"]["checkpoint"]["sha256"]
    observed(f"perturbation (FGSM on the tiny ANN, image 0): l2 input {l2['input']:.3f}, ReLU {l2['relu']:.3f}, "
             f"encoded {l2['encoded']:.3f}, LIF(spikes) {l2['lif']:.3f}, LIF(current) {l2['lif_current']:.3f}; "
             f"relative l2 input {r['relative_l2']['input']:.4f}, LIF(spikes) {r['relative_l2']['lif']:.4f}")
    # without a checkpoint: a random sign perturbation of the same budget
    out = tmp_path / "pert-random"
    assert main(["analyze", "perturbation"] + _base(shared_data) + ["--test-subset", "20", "--out", str(out)]) == 0
    q = _load(out, "perturbation")
    assert q["settings"]["attack"] == "random-sign" and q["checks"]["relu_l2_equals_input_l2"]
    assert q["l2"]["input"] == pytest.approx((8 / 255) * math.sqrt(3 * 32 * 32), rel=0.2)  # few pixels clip
    assert q["l2"]["lif"] <= q["l2"]["input"]


def test_perturbation_norms_theory():
    """ReLU keeps the l2 of a perturbation of non-negative inputs; of signed inputs it can only shrink it."""
    from snnadv.analysis.perturbation import perturbation_norms

    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 8, 8, generator=g)
    x_adv = (x + 0.05 * torch.sign(torch.randn(x.shape, generator=g))).clamp(0, 1)
    r = perturbation_norms(x, x_adv, timesteps=50)
    assert r["l2"]["relu"] == pytest.approx(r["l2"]["input"], abs=1e-7)
    xs, xs_adv = x * 2 - 1, x_adv * 2 - 1  # signed: ReLU clips part of the perturbation away
    assert torch.relu(xs_adv).sub(torch.relu(xs)).norm() < (xs_adv - xs).norm()
    # same encoder draws: identical images give identical spike outputs
    same = perturbation_norms(x, x.clone(), timesteps=50)
    assert same["l2"]["lif"] == 0.0 and same["l2"]["encoded"] == 0.0


# --------------------------------------------------------------------------- sweeps
def _complete(sdir: Path) -> list[str]:
    out = []
    for f in sorted(sdir.glob("snn-*.json")):
        d = json.loads(f.read_text())
        if d.get("complete"):
            out.append(d["key"])
    return out


def test_timesteps_sweep_outputs(timesteps_run, chain, observed):
    from snnadv.checkpoint import file_hash, load_checkpoint

    r = _load(timesteps_run, "timesteps")
    assert r["computed"] == 4 and r["reused"] == 0
    assert [(x["bits"], x["timesteps"]) for x in r["rows"]] == [("2", 4), ("2", 8), ("4", 4), ("4", 8)]
    assert [x["bits"] for x in r["ann"]] == ["2", "4"]  # the ANN reference (the conv's own parent)
    for row in r["rows"] + r["ann"]:
        for k in ("clean", "fgsm", "pgd"):
            assert 0.0 <= row[k] <= 100.0
    assert r["inputs"]["checkpoint"]["sha256"] == file_hash(chain["conv"])
    assert r["inputs"]["source"]["sha256"] == file_hash(chain["ann_ii"])
    assert r["inputs"]["ann"]["sha256"] == file_hash(chain["ann"])
    titles = [t["title"] for t in r["tables"]]
    assert any("Clean" in t for t in titles) and any("FGSM" in t for t in titles)
    for row in r["rows"]:
        rec = json.loads((timesteps_run / "settings" / f"{row['key']}.json").read_text())
        assert rec["complete"] and rec["inputs"] == {"checkpoint": file_hash(chain["conv"]),
                                                     "source": file_hash(chain["ann_ii"])}
        ck = load_checkpoint(timesteps_run / "settings" / f"{row['key']}.pt", "snn-bp")
        assert ck["model"]["input_bits"] == int(row["bits"]) and ck["model"]["num_steps"] == row["timesteps"]
        assert ck["model"]["leak"] == pytest.approx(0.99)
        assert rec["models"]["finetuned"]["sha256"] == file_hash(timesteps_run / "settings" / f"{row['key']}.pt")
    cells = {(x["bits"], x["timesteps"]): (round(x["clean"], 1), round(x["fgsm"], 1), round(x["pgd"], 1))
             for x in r["rows"]}
    ann = {x["bits"]: (round(x["clean"], 1), round(x["fgsm"], 1), round(x["pgd"], 1)) for x in r["ann"]}
    observed(f"timesteps sweep (tiny, 20 test images) clean/FGSM/PGD %: SNN-BP {cells}; ANN {ann}")


def test_sweep_resumes_without_recomputing(timesteps_run, shared_data, chain, tmp_path, monkeypatch, capsys):
    import snnadv.robustness
    import snnadv.train

    out = tmp_path / "timesteps"
    shutil.copytree(timesteps_run, out)
    sdir = out / "settings"
    real = snnadv.train.finetune
    calls: list[str] = []

    resumed: list[bool] = []

    def counting(cfg, reporter=None):
        calls.append(Path(cfg["out"]).stem)
        resumed.append(bool(cfg["resume"]))
        return real(cfg, reporter)

    def forbidden(*a, **k):
        raise AssertionError("recomputed a finished setting")

    args = _sweep_args(shared_data, chain, "timesteps", out, "--timesteps", "4,8", "--bits", "2,4")

    # 1. a finished sweep: nothing is fine-tuned, crafted or written again
    mtimes = {f: f.stat().st_mtime_ns for f in sdir.iterdir()}
    monkeypatch.setattr(snnadv.train, "finetune", forbidden)
    monkeypatch.setattr(snnadv.robustness, "craft", forbidden)
    assert main(args) == 0
    assert {f: f.stat().st_mtime_ns for f in sdir.iterdir()} == mtimes
    assert json.loads((out / "timesteps.json").read_text())["reused"] == 4
    monkeypatch.undo()

    # 2. Ctrl-C: two settings lost; interrupted during the second re-computation -> exit 130
    for key in ("snn-bp_b4_T4_l0.99", "snn-bp_b4_T8_l0.99"):
        (sdir / f"{key}.json").unlink()
        (sdir / f"{key}.pt").unlink()

    def interrupted(cfg, reporter=None):
        calls.append(Path(cfg["out"]).stem)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(cfg, reporter)

    monkeypatch.setattr(snnadv.train, "finetune", interrupted)
    capsys.readouterr()
    assert main(args) == 130
    assert "interrupted" in capsys.readouterr().err
    assert _complete(sdir) == ["snn-bp_b2_T4_l0.99", "snn-bp_b2_T8_l0.99", "snn-bp_b4_T4_l0.99"]

    # 3. the re-run computes only the setting in progress at the interruption
    calls.clear()
    monkeypatch.setattr(snnadv.train, "finetune", counting)
    assert main(args) == 0
    assert calls == ["snn-bp_b4_T8_l0.99"]
    r = json.loads((out / "timesteps.json").read_text())
    assert (r["computed"], r["reused"]) == (1, 3)

    # 4. a new grid point: only it is computed (for each bit-width)
    calls.clear()
    args6 = _sweep_args(shared_data, chain, "timesteps", out, "--timesteps", "4,6", "--bits", "2,4")
    assert main(args6) == 0
    assert sorted(calls) == ["snn-bp_b2_T6_l0.99", "snn-bp_b4_T6_l0.99"]
    r = json.loads((out / "timesteps.json").read_text())
    assert (r["computed"], r["reused"]) == (2, 2) and [x["timesteps"] for x in r["rows"]] == [4, 6, 4, 6]

    # 5. one setting's record no longer matches (as if it came from other settings): only it is
    #    recomputed, and its finished fine-tuned checkpoint is re-used, not trained again
    f = sdir / "snn-bp_b2_T4_l0.99.json"
    rec = json.loads(f.read_text())
    rec["signature"] = "0" * 64
    f.write_text(json.dumps(rec))
    calls.clear()
    assert main(args6) == 0
    assert calls == []
    r = json.loads((out / "timesteps.json").read_text())
    assert (r["computed"], r["reused"]) == (1, 3)
    assert [x["status"] for x in r["rows"]] == ["computed", "reused", "reused", "reused"]

    # 6. an evaluation setting changes (eps): every setting is re-evaluated, none re-trained
    assert main(args6 + ["--eps", "4/255"]) == 0
    assert calls == []
    r = json.loads((out / "timesteps.json").read_text())
    assert r["computed"] == 4 and r["settings"]["eps"] == pytest.approx(4 / 255)

    # 7. a fine-tuning checkpoint with fewer epochs than asked for is continued (finetune --resume)
    from snnadv.analysis.sweep import _finetune_state
    from snnadv.checkpoint import file_hash, load_checkpoint

    pt = sdir / "snn-bp_b2_T4_l0.99.pt"
    ck = load_checkpoint(pt)
    resumed.clear()
    one = _sweep_args(shared_data, chain, "timesteps", out, "--timesteps", "4", "--bits", "2")
    assert main([a if a != "1" else "2" for a in one]) == 0  # --epochs 2
    assert calls == ["snn-bp_b2_T4_l0.99"] and resumed == [True]
    ck2 = load_checkpoint(pt)
    assert ck2["train_state"]["epoch"] == 2 and len(ck2["metrics"]["history"]) == 2
    assert ck2["metrics"]["history"][0] == ck["metrics"]["history"][0]  # the first epoch was not redone
    parent_sha = file_hash(ck2["parent"]["path"])
    assert _finetune_state(pt, ck2["config"], parent_sha) == "complete"
    assert _finetune_state(pt, {**ck2["config"], "epochs": 3, "resume": False}, parent_sha) == "resumable"
    assert _finetune_state(pt, ck["config"], parent_sha) == "fresh"  # fewer epochs than trained
    assert _finetune_state(pt, {**ck2["config"], "lr": 1.0}, parent_sha) == "fresh"
    assert _finetune_state(pt, ck2["config"], "0" * 64) == "fresh"


def test_leak_sweep(leak_run, observed):
    from snnadv.checkpoint import load_checkpoint

    r = _load(leak_run, "leak")
    assert [x["leak"] for x in r["rows"]] == [1.0, 0.95] and r["computed"] == 2
    assert r["rows"][0]["bits"] == "none" and r["ann"][0]["bits"] == "none"
    for row in r["rows"]:
        ck = load_checkpoint(leak_run / "settings" / f"{row['key']}.pt", "snn-bp")
        assert ck["model"]["leak"] == pytest.approx(row["leak"]) and ck["model"]["input_bits"] is None
    observed("leak sweep (tiny, T=4) clean/FGSM/PGD %: "
             + ", ".join(f"λ={x['leak']:g}: {x['clean']:.1f}/{x['fgsm']:.1f}/{x['pgd']:.1f}" for x in r["rows"]))


def test_snn_conv_sweep_evaluates_without_training(shared_data, chain, tmp_path, monkeypatch):
    import snnadv.train

    monkeypatch.setattr(snnadv.train, "finetune", lambda *a, **k: pytest.fail("snn-conv must not be fine-tuned"))
    out = tmp_path / "conv-sweep"
    args = _sweep_args(shared_data, chain, "timesteps", out, "--model", "snn-conv", "--timesteps", "8,16",
                       "--bits", "2,none", "--attacks", "fgsm")
    assert main(args) == 0
    r = _load(out, "timesteps")
    assert [(x["bits"], x["timesteps"], x["leak"]) for x in r["rows"]] == [
        ("2", 8, 1.0), ("2", 16, 1.0), ("none", 8, 1.0), ("none", 16, 1.0)]
    assert "pgd" not in r["rows"][0] and not list((out / "settings").glob("*.pt"))


# --------------------------------------------------------------------------- report
def test_report_mentions_every_analysis(timesteps_run, leak_run, eq7_run, encoder_run, perturbation_run, runs,
                                        chain):
    (runs / "pipeline").mkdir(exist_ok=True)
    for name in ("ann.json", "conv.json"):
        shutil.copy(chain["root"] / name, runs / "pipeline" / name)
    (runs / "misc").mkdir(exist_ok=True)
    (runs / "misc" / "mystery.json").write_text(json.dumps({"alpha_thing": 1, "beta_list": [1, 2]}))
    (runs / "misc" / "broken.json").write_text("{not json")
    (runs / "misc" / "vgg5_evaluate.md").write_text("| a | b |\n|---|---|\n| 1 | 2 |\n")
    assert main(["report", str(runs), "--quiet"]) == 0
    md = (runs / "report.md").read_text()
    for name in ("timesteps", "leak", "eq7", "encoder", "perturbation"):
        assert f"snnadv analyze {name}" in md
        assert f"]({name}/{name}.png)" in md
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (runs / link).is_file(), link
    assert "Pipeline stages" in md and "snn-conv" in md
    assert "mystery.json" in md and "`alpha_thing`" in md and "broken.json" in md
    assert "## Evaluate" in md and "| 1 | 2 |" in md
    assert "sha256" in md and "Checks against theory" in md
    assert "settings/" not in md  # per-setting files are summarised by their sweeps


# --------------------------------------------------------------------------- bad input
def test_bad_input_is_one_line_error(shared_data, tmp_path, capsys):
    ck = ["--checkpoint", str(tmp_path / "none.pt"), "--source-ckpt", str(tmp_path / "none2.pt")]
    out = ["--out", str(tmp_path / "o")]
    bad = [
        ["analyze", "encoder", "--bits", "3x"] + out,                       # unknown bits value
        ["analyze", "encoder", "--bits", "9"] + out,                        # bits outside 1-8
        ["analyze", "timesteps", "--bits", "2,abc"] + ck + out,             # checked before any file is read
        ["analyze", "leak", "--leaks", "1.5"] + ck + out,                   # leak out of range
        ["analyze", "leak", "--leaks", "0,0.9"] + ck + out,
        ["analyze", "timesteps", "--timesteps", ""] + ck + out,             # empty lists
        ["analyze", "encoder", "--timesteps", ","] + out,
        ["analyze", "leak", "--leaks", ""] + ck + out,
        ["analyze", "timesteps", "--timesteps", "0,4"] + ck + out,
        ["analyze", "timesteps", "--attacks", "cw"] + ck + out,
        ["analyze", "timesteps"] + out,                                      # no --checkpoint
        ["analyze", "timesteps"] + ck + out,                                 # checkpoint does not exist
        ["analyze", "eq7", "--ratios", "-1"] + out,
        ["analyze", "eq7", "--lam-min", "0.9", "--lam-max", "0.8"] + out,
        ["analyze", "perturbation", "--leak", "1.2"] + out,
        ["analyze", "perturbation", "--timesteps", "4,8"] + out,
        ["analyze", "perturbation", "--data-dir", str(shared_data), "--image", "5000", "--test-subset", "20"] + out,
        ["report", str(tmp_path / "no-such-run")],
    ]
    capsys.readouterr()
    for b in bad:
        assert main(b) != 0, b
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, (b, err)


def test_config_table_and_help(tmp_path, capsys):
    cfg = tmp_path / "a.toml"
    cfg.write_text('[analyze]\nbits = ["none", 2]\ntimesteps = [4, 8]\npoints = 51\n')
    out = tmp_path / "enc"
    assert main(["analyze", "encoder", "--quiet", "--config", str(cfg), "--out", str(out)]) == 0
    r = _load(out, "encoder")
    assert r["settings"]["bits"] == ["none", "2"] and r["settings"]["timesteps"] == [4, 8]
    assert r["settings"]["config"] == str(cfg)
    none = [s for s in r["summary"] if s["bits"] == "none"]
    assert none[0]["levels_quantised"] == 51 and none[0]["quant_err"] == 0.0  # no quantisation
    cfg.write_text("[analyze]\nbitz = [2]\n")
    capsys.readouterr()
    assert main(["analyze", "encoder", "--config", str(cfg), "--out", str(out)]) != 0
    assert capsys.readouterr().err.startswith("error: unknown setting 'bitz'")
    for cmd in ("timesteps", "leak", "eq7", "encoder", "perturbation"):
        assert main(["analyze", cmd, "--help"]) == 0
        text = capsys.readouterr().out
        assert "--config" in text and "--out" in text
    assert main(["report", "--help"]) == 0


def test_leak_sweep_default_timesteps_follow_the_config(chain, tmp_path):
    """Without --timesteps the leak sweep fine-tunes at the config's [finetune] T (not
    the paper's T for the architecture, which is far too slow for a CPU config)."""
    from snnadv.analysis.sweep import default_timesteps
    from snnadv.checkpoint import load_checkpoint
    from snnadv.config import FINETUNE_STEPS

    conv = load_checkpoint(chain["conv"])
    cfg = tmp_path / "c.toml"
    cfg.write_text("[finetune]\ntimesteps = 12\n")
    assert default_timesteps("leak", "snn-bp", conv, str(cfg)) == [12]
    assert default_timesteps("leak", "snn-bp", conv, None) == [FINETUNE_STEPS["tiny"]]
    assert default_timesteps("leak", "snn-conv", conv, str(cfg)) == [int(conv["model"]["num_steps"])]
    assert default_timesteps("timesteps", "snn-bp", conv, str(cfg)) == [50, 75, 100, 150]
