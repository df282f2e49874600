"""``snnadv reproduce``: end to end on a tiny config, interrupted, resumed, re-keyed."""

from __future__ import annotations

import json

import pytest

CONFIG = """
[common]
dataset = "cifar10"
data_dir = "{data}"
device = "cpu"
batch_size = 64
train_subset = 640
test_subset = 40

[reproduce]
seeds = [0, 1]
analyses = ["eq7", "encoder"]

[train-ann]
arch = "tiny"
epochs = 2
lr = 0.05

[convert]
timesteps = 16
curve = [8, 16]
percentile = 99.9

[finetune]
timesteps = 4
epochs = 1
train_subset = 128
lr = {lr}

[table]
steps = 2
test_subset = 20

[analyze]
ratios = [0.2, 0.5]
points = 5
sim_steps = 200
timesteps = [4, 16]
"""


def _config(tmp_path, shared_data, lr="1e-4"):
    path = tmp_path / "tiny.toml"
    path.write_text(CONFIG.format(data=shared_data, lr=lr))
    return path


def _forbid(monkeypatch, *names):
    """Make the named library stages fail if they are called (they must be skipped)."""
    import snnadv.convert
    import snnadv.train

    targets = {"train_ann": snnadv.train, "finetune": snnadv.train, "convert": snnadv.convert}

    def boom(*a, **k):
        raise AssertionError("a completed stage was recomputed")

    for n in names:
        monkeypatch.setattr(targets[n], n, boom)


def test_reproduce_interrupt_resume_and_rekey(tmp_path, shared_data, monkeypatch):
    from snnadv.reproduce import reproduce

    run_dir = tmp_path / "run"
    cfg = _config(tmp_path, shared_data)
    # 1. interrupted after three stages (a stage limit stands in for Ctrl-C between stages)
    done = reproduce(cfg, run_dir, max_stages=3, quiet=True)
    assert set(done) == {"ann", "conv", "bp"}
    assert not json.loads((run_dir / "reproduce.json").read_text())["complete"]
    first = {n: (run_dir / "stages" / f"{n}.json").read_text() for n in done}

    # 2. run again: the completed stages are not recomputed, the rest completes
    done = reproduce(cfg, run_dir, quiet=True)
    for n, text in first.items():
        assert (run_dir / "stages" / f"{n}.json").read_text() == text  # untouched
    summary = json.loads((run_dir / "reproduce.json").read_text())
    assert summary["complete"]
    names = list(summary["stages"])
    assert names[:6] == ["ann", "conv", "bp", "ann_ii", "conv_ii", "bp_ii"]
    assert {"table", "analyze-eq7", "analyze-encoder", "report"} <= set(names)
    report = (run_dir / "report.md").read_text()
    assert "Table 1" in report and "Table 2" in report
    assert "eq7" in report.lower() and "encoder" in report.lower()
    tables = json.loads((run_dir / "tables" / "tables.json").read_text())
    assert set(tables["table1"]["blackbox"]["pgd"]) == {"ann", "snn_conv", "snn_bp"}

    # 3. nothing changed: a third run recomputes nothing at all
    with monkeypatch.context() as m:
        _forbid(m, "train_ann", "convert", "finetune")
        import snnadv.robustness

        m.setattr(snnadv.robustness, "run_table", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
        reproduce(cfg, run_dir, quiet=True)

    # 4. a changed fine-tuning setting re-runs fine-tuning and what follows, not the ANNs
    keys_before = {n: json.loads((run_dir / "stages" / f"{n}.json").read_text())["key"] for n in names}
    cfg2 = _config(tmp_path, shared_data, lr="2e-4")
    with monkeypatch.context() as m:
        _forbid(m, "train_ann", "convert")
        reproduce(cfg2, run_dir, quiet=True)
    keys_after = {n: json.loads((run_dir / "stages" / f"{n}.json").read_text())["key"] for n in names}
    for n in ("ann", "conv", "ann_ii", "conv_ii", "analyze-eq7", "analyze-encoder"):
        assert keys_after[n] == keys_before[n], n
    for n in ("bp", "bp_ii", "table", "report"):
        assert keys_after[n] != keys_before[n], n


def test_reproduce_bad_input(tmp_path, shared_data, capsys):
    from snnadv.cli.main import main

    cfg = _config(tmp_path, shared_data)
    for args in (["reproduce", "--config", str(tmp_path / "missing.toml")],
                 ["reproduce", "--config", str(cfg), "--only", "nonsense"],
                 ["reproduce", "--config", str(cfg), "--run-dir", str(tmp_path / "r"), "--only", "table"]):
        assert main(args) != 0
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err, err


def test_cli_options_override_every_stage(shared_data, tmp_path, capsys):
    """reproduce takes the shared options (data, subsets, batch size, the pair of seeds)
    and passes them to every stage, overriding the config; bad values are one line."""
    from snnadv.cli.main import main

    cfg = tmp_path / "cfg.toml"
    cfg.write_text(CONFIG.format(data=tmp_path / "no-such-data", lr="1e-4"))
    run_dir = tmp_path / "run"
    args = ["reproduce", "--config", str(cfg), "--run-dir", str(run_dir), "--max-stages", "1", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--data-dir DIR" in err and "--download" in err and len(err.strip().splitlines()) == 1
    assert main(args + ["--data-dir", str(shared_data), "--seed", "3,4", "--batch-size", "32",
                        "--train-subset", "320", "--test-subset", "30", "--device", "cpu"]) == 0
    ann = json.loads((run_dir / "models" / "ann.json").read_text())["config"]
    assert (ann["data_dir"], ann["seed"], ann["batch_size"], ann["train_subset"], ann["test_subset"]) == \
        (str(shared_data), 3, 32, 320, 30)
    capsys.readouterr()
    for bad in ("3", "3,3", "a,b"):
        assert main(args + ["--data-dir", str(shared_data), "--seed", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err


PROTOCOL = """
[evaluate]
protocol = "quick"
protocol_attacks = ["fgsm", "apgd-ce"]
apgd_steps = 2
test_subset = 16
"""


def _protocol_config(tmp_path, shared_data, sources='["ann_ii"]'):
    """The tiny config with Table 1 under the quick protocol (SNN-conv at T=4 via [table])."""
    text = CONFIG.format(data=shared_data, lr="1e-4").replace('analyses = ["eq7", "encoder"]',
                                                              f"analyses = []\nevaluate = true\n"
                                                              f"evaluate_sources = {sources}")
    path = tmp_path / "protocol.toml"
    path.write_text(text.replace("[table]\n", "[table]\nconv_timesteps = 4\n") + PROTOCOL)
    return path


def test_reproduce_table1_under_a_protocol(tmp_path, shared_data, monkeypatch):
    """[evaluate] protocol: whitebox per seed-I model, transfer from the configured
    sources, the side-by-side Table 1; a second run is a no-op; the report shows it."""
    from snnadv.reproduce import reproduce

    run_dir = tmp_path / "run"
    cfg = _protocol_config(tmp_path, shared_data)
    done = reproduce(cfg, run_dir, quiet=True)
    ev = run_dir / "evaluate"
    targets = ("ann", "conv", "bp")
    expected = {f"evaluate-{t}" for t in targets} | {f"evaluate-{t}-from-ann_ii" for t in targets} | {
        "evaluate-compare", "report"}
    assert expected <= set(done) and "evaluate" not in done
    assert json.loads((run_dir / "reproduce.json").read_text())["complete"]
    per = {}
    for t in targets:
        per[t] = json.loads((ev / f"{t}.json").read_text())
        assert per[t]["mode"] == "whitebox" and per[t]["protocol"] == "quick"
        tr = json.loads((ev / f"{t}-from-ann_ii.json").read_text())
        assert tr["mode"] == "transfer" and tr["source"]["path"] == str(run_dir / "models" / "ann_ii.pt")
    assert per["conv"]["target"]["num_steps"] == 4  # [table] conv_timesteps, as the table
    table = json.loads((ev / "table1-whitebox.json").read_text())
    names = {"ANN": "ann", "SNN-conv": "conv", "SNN-BP": "bp"}
    assert table["models"] == list(names) and table["reference"] == "ANN"
    for n, t in names.items():
        assert table["accuracy"][n]["clean"][0]["mean"] == per[t]["clean"]["mean"]
        assert table["accuracy"][n]["quick"][0]["mean"] == per[t]["worst_case"][0]["mean"]
    blackbox = json.loads((ev / "table1-from-ann_ii.json").read_text())
    assert blackbox["models"] == list(names) and {s["mode"] for s in blackbox["sources"].values()} == {"transfer"}
    assert not (ev / "table1-from-conv_ii.json").exists()
    report = (run_dir / "report.md").read_text()
    assert "table1-whitebox.md" in report and "table1-from-ann_ii.md" in report

    # a second run: every stage done, nothing recomputed
    import snnadv.adaptive

    monkeypatch.setattr(snnadv.adaptive, "run_protocol", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    monkeypatch.setattr(snnadv.adaptive, "run_compare", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    _forbid(monkeypatch, "train_ann", "convert", "finetune")
    records = {n: (run_dir / "stages" / f"{n}.json").read_text() for n in done}
    again = reproduce(cfg, run_dir, quiet=True)
    assert set(again) == set(done)
    assert {n: (run_dir / "stages" / f"{n}.json").read_text() for n in done} == records


def test_reproduce_protocol_stages_and_bad_sources(tmp_path, shared_data, capsys):
    """The plan: no protocol keeps the one evaluate stage; [] sources = whitebox only;
    a bad source is one line, exit 2."""
    from snnadv.cli.main import main
    from snnadv.config import read_config
    from snnadv.reproduce import Context, stages

    def plan(path):
        return [s.name for s in stages(Context(tmp_path, read_config(path), None, [0, 1]))]

    whitebox = plan(_protocol_config(tmp_path, shared_data, sources="[]"))
    assert [n for n in whitebox if n.startswith("evaluate")] == [
        "evaluate-ann", "evaluate-conv", "evaluate-bp", "evaluate-compare"]
    old = _protocol_config(tmp_path, shared_data)
    old.write_text(old.read_text().replace('protocol = "quick"\n', ""))
    assert [n for n in plan(old) if n.startswith("evaluate")] == ["evaluate"]
    bad = _protocol_config(tmp_path, shared_data, sources='["ann_ii", "vgg_ii"]')
    assert main(["reproduce", "--config", str(bad), "--run-dir", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "vgg_ii" in err and "evaluate_sources" in err and "\n" not in err, err
