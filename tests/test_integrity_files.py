"""No run destroys, mixes up or silently replaces a result (snnadv.outputs, snnadv.reproduce).

Real files and real processes: outputs equal to inputs (by path, symlink, hard link),
the overwrite rule with SIGINT, two concurrent writers, stale locks, orphan temporary
files after kill -9, truncated stage outputs, and progress lines in logs.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_reproduce import _config, _forbid

#: the CLI in a fresh interpreter (``python -m`` would load the command module twice)
SNNADV = [sys.executable, "-c", "import sys; from snnadv.cli.main import main; sys.exit(main())"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _tiny(shared_data, *extra):
    return ["--data-dir", str(shared_data), "--device", "cpu", "--train-subset", "128", "--test-subset", "20",
            "--batch-size", "32", *map(str, extra)]


def _run(args, **kw):
    return subprocess.run(SNNADV + list(map(str, args)), capture_output=True, text=True, env=ENV, timeout=300, **kw)


def _one_line_error(proc) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert err.startswith("error:") and "\n" not in err, err
    return err


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background test run may have inherited SIG_IGN


def _start(args) -> subprocess.Popen:
    return subprocess.Popen(SNNADV + list(map(str, args)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=ENV, preexec_fn=_default_sigint)


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 120) -> str:
    """Read ``proc``'s output until a line containing ``text``."""
    seen, t0 = [], time.time()
    while time.time() - t0 < timeout:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if text in line:
            return "".join(seen)
    proc.kill()
    raise AssertionError(f"'{text}' never printed: {''.join(seen)}")


@pytest.fixture(scope="module")
def tiny(shared_data, tmp_path_factory):
    """A tiny ANN and its SNN-conv, written by the CLI."""
    d = tmp_path_factory.mktemp("tiny")
    assert _run(["train-ann", "--arch", "tiny", "--epochs", "1", "--out", d / "ann.pt", *_tiny(shared_data)]).returncode == 0
    assert _run(["convert", "--checkpoint", d / "ann.pt", "--timesteps", "4", "--curve", "4", "--out", d / "conv.pt",
                 *_tiny(shared_data)]).returncode == 0
    return d


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.is_symlink()}


# --------------------------------------------------------------------------- item 1: output == input
@pytest.mark.parametrize("how", ["same", "symlink", "hardlink", "dotdot", "json"])
@pytest.mark.parametrize("command", ["convert", "finetune"])
def test_output_equal_to_input_is_refused_before_any_work(tiny, shared_data, tmp_path, command, how):
    src = tmp_path / "in.pt"
    src.write_bytes((tiny / ("ann.pt" if command == "convert" else "conv.pt")).read_bytes())
    out = {"same": src, "symlink": tmp_path / "link.pt", "hardlink": tmp_path / "hard.pt",
           "dotdot": tmp_path / "sub" / ".." / "in.pt", "json": tmp_path / "in.pt"}[how]
    if how == "symlink":
        out.symlink_to(src.name)
    if how == "hardlink":
        os.link(src, out)
    ckpt = src
    if how == "json":  # the JSON written beside --out is the input
        ckpt = tmp_path / "in.json"
        src.rename(ckpt)
        out = tmp_path / "in.pt"
    before = _snapshot(tmp_path)
    t0 = time.perf_counter()
    err = _one_line_error(_run([command, "--checkpoint", ckpt, "--out", out, "--timesteps", "4", "--overwrite",
                                *_tiny(shared_data)]))
    assert "input" in err and "nothing was written" in err, err
    assert _snapshot(tmp_path) == before  # the input byte-identical, nothing added
    assert not (tmp_path / "sub").exists()
    assert time.perf_counter() - t0 < 60


def test_output_inside_the_data_folder_is_refused(shared_data):
    err = _one_line_error(_run(["train-ann", "--arch", "tiny", "--out", shared_data / "train" / "x.pt",
                                *_tiny(shared_data)]))
    assert "input folder" in err and not (shared_data / "train" / "x.pt").exists()


@pytest.mark.parametrize("where", ["readonly", "file-as-folder", "devnull"])
def test_unwritable_output_is_refused_before_training(shared_data, tmp_path, where):
    ro = tmp_path / "ro"
    ro.mkdir()
    (tmp_path / "f").write_text("x")
    out = {"readonly": ro / "a.pt", "file-as-folder": tmp_path / "f" / "a.pt", "devnull": "/dev/null"}[where]
    os.chmod(ro, 0o555)  # honoured even as root
    try:
        err = _one_line_error(_run(["train-ann", "--arch", "tiny", "--epochs", "1", "--out", out, *_tiny(shared_data)]))
    finally:
        os.chmod(ro, 0o755)
    assert "cannot write" in err or "not a regular file" in err, err
    assert list(ro.iterdir()) == [] and "epoch" not in err


# --------------------------------------------------------------------------- item 2: the overwrite rule
def test_fresh_run_over_an_existing_result_is_refused(tiny, shared_data, tmp_path):
    for name in ("ann.pt", "ann.json"):
        (tmp_path / name).write_bytes((tiny / name).read_bytes())
    before = _snapshot(tmp_path)
    err = _one_line_error(_run(["train-ann", "--arch", "tiny", "--epochs", "1", "--out", tmp_path / "ann.pt",
                                *_tiny(shared_data)]))
    assert "exists (an ann checkpoint of" in err and "--resume" in err and "--overwrite" in err, err
    err = _one_line_error(_run(["convert", "--checkpoint", tiny / "ann.pt", "--out", tmp_path / "ann.pt",
                                *_tiny(shared_data)]))
    assert "exists" in err and "--overwrite" in err and "--resume" not in err, err
    assert _snapshot(tmp_path) == before


def test_overwrite_keeps_the_old_file_until_the_first_epoch(tiny, shared_data, tmp_path):
    for name in ("ann.pt", "ann.json"):
        (tmp_path / name).write_bytes((tiny / name).read_bytes())
    before = _snapshot(tmp_path)
    proc = _start(["train-ann", "--arch", "tiny", "--epochs", "3", "--overwrite", "--out", tmp_path / "ann.pt",
                   "--data-dir", shared_data, "--device", "cpu", "--train-subset", "5000", "--test-subset", "20",
                   "--batch-size", "16"])
    _wait_for(proc, "training ANN")
    time.sleep(0.5)  # inside epoch 1
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "epoch   1/3" not in out, "the run finished an epoch before the signal: make the epoch longer"
    assert _snapshot(tmp_path) == before  # the old checkpoint and its JSON, byte-identical
    assert not list(tmp_path.glob(".*.tmp"))


def test_overwrite_replaces_checkpoint_and_json_together(tiny, shared_data, tmp_path):
    for name in ("ann.pt", "ann.json"):
        (tmp_path / name).write_bytes((tiny / name).read_bytes())
    proc = _run(["train-ann", "--arch", "tiny", "--epochs", "1", "--seed", "3", "--overwrite",
                 "--out", tmp_path / "ann.pt", *_tiny(shared_data)])
    assert proc.returncode == 0, proc.stderr
    from snnadv.checkpoint import file_hash

    meta = json.loads((tmp_path / "ann.json").read_text())
    assert meta["sha256"] == file_hash(tmp_path / "ann.pt") != file_hash(tiny / "ann.pt")
    assert meta["config"]["seed"] == 3


# --------------------------------------------------------------------------- item 3: locks
def test_second_writer_stops_with_one_line_naming_the_first(shared_data, tmp_path):
    out = tmp_path / "ann.pt"
    first = _start(["train-ann", "--arch", "tiny", "--epochs", "50", "--out", out, "--data-dir", shared_data,
                    "--device", "cpu", "--train-subset", "2000", "--test-subset", "20"])
    try:
        _wait_for(first, "training ANN")
        second = _run(["train-ann", "--arch", "tiny", "--epochs", "1", "--overwrite", "--out", out,
                       *_tiny(shared_data)])
        err = _one_line_error(second)
        assert f"is being written by pid {first.pid} on host" in err and "train-ann" in err, err
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)


def test_stale_lock_of_a_dead_process_is_taken_over(shared_data, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    out = tmp_path / "ann.pt"
    (tmp_path / ".ann.pt.lock").write_text(json.dumps({"pid": pid, "host": "h", "started": time.time(),
                                                        "command": "snnadv train-ann"}))
    proc = _run(["train-ann", "--arch", "tiny", "--epochs", "1", "--out", out, *_tiny(shared_data)])
    assert proc.returncode == 0, proc.stderr
    notes = [l for l in (proc.stdout + proc.stderr).splitlines() if "stale lock" in l]
    assert len(notes) == 1 and f"pid {pid}" in notes[0] and "taken over" in notes[0], notes
    assert out.is_file() and not (tmp_path / ".ann.pt.lock").exists()  # a free output has no lock file


def test_two_reproduce_runs_in_one_directory(tmp_path, shared_data):
    cfg = _config(tmp_path, shared_data)
    run_dir = tmp_path / "run"
    first = _start(["reproduce", "--config", cfg, "--run-dir", run_dir])
    try:
        _wait_for(first, "[1/")
        err = _one_line_error(_run(["reproduce", "--config", cfg, "--run-dir", run_dir]))
        assert f"is being written by pid {first.pid}" in err and "reproduce" in err, err
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)


# --------------------------------------------------------------------------- item 5: orphan temp files
def test_orphan_temp_files_are_removed_on_the_next_write(shared_data, tmp_path):
    out = tmp_path / "ann.pt"
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom snnadv.outputs import atomic_target\n"
        f"with atomic_target({str(out)!r}) as tmp:\n    open(tmp, 'w').write('half')\n    print(tmp, flush=True)\n"
        "    time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    orphan = Path(writer.stdout.readline().strip())
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    alive = tmp_path / f".ann.pt.{os.getpid()}-abcdefgh.tmp"  # a live writer's file is left alone
    alive.write_text("x")
    other = tmp_path / ".other.pt.1-abcdefgh.tmp"  # another output's
    other.write_text("x")
    assert orphan.exists() and not out.exists()
    proc = _run(["train-ann", "--arch", "tiny", "--epochs", "1", "--out", out, *_tiny(shared_data)])
    assert proc.returncode == 0, proc.stderr
    assert not orphan.exists() and alive.exists() and other.exists()
    from snnadv.checkpoint import load_checkpoint

    assert load_checkpoint(out, "ann")["stage"] == "ann"


# --------------------------------------------------------------------------- items 4, 13: reproduce
def test_truncated_stage_output_reruns_it_and_downstream(tmp_path, shared_data, monkeypatch):
    from snnadv.reproduce import reproduce

    cfg = _config(tmp_path, shared_data)
    run_dir = tmp_path / "run"
    reproduce(cfg, run_dir, quiet=True)
    assert json.loads((run_dir / "reproduce.json").read_text())["complete"]
    records = lambda: {p.stem: p.read_text() for p in (run_dir / "stages").glob("*.json")}  # noqa: E731
    before = records()
    conv = run_dir / "models" / "conv.pt"
    conv.write_bytes(conv.read_bytes()[:1000])
    with monkeypatch.context() as m:  # --only / --from downstream of it: refused, not counted as done
        _forbid(m, "train_ann", "finetune")
        with pytest.raises(Exception, match="needs conv first"):
            reproduce(cfg, run_dir, only=["bp"], quiet=True)
    with monkeypatch.context() as m:
        _forbid(m, "train_ann")
        done = reproduce(cfg, run_dir, quiet=True)
    after = records()
    for n in ("ann", "ann_ii", "conv_ii", "bp_ii", "analyze-eq7", "analyze-encoder"):
        assert after[n] == before[n], n
    for n in ("conv", "bp", "table", "report"):
        assert after[n] != before[n], n
    assert json.loads((run_dir / "reproduce.json").read_text())["complete"] and len(done) == 10

    # item 13: the same run asked for with --device auto re-runs nothing
    with monkeypatch.context() as m:
        _forbid(m, "train_ann", "convert", "finetune")
        import snnadv.robustness

        m.setattr(snnadv.robustness, "run_table", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
        reproduce(cfg, run_dir, quiet=True, flags={"device": "auto"})
    assert records() == after
    assert json.loads(after["ann"])["hardware"] == "cpu"

    # a changed ANN setting with --max-stages 1: the ANN re-runs, the rest is stale, not complete
    cfg2 = tmp_path / "changed.toml"
    cfg2.write_text(cfg.read_text().replace("lr = 0.05", "lr = 0.04"))
    done = reproduce(cfg2, run_dir, max_stages=1, quiet=True)
    summary = json.loads((run_dir / "reproduce.json").read_text())
    assert not summary["complete"]
    assert "ann" in done and "conv" not in done and "bp" not in done and "table" not in done
    assert (run_dir / "models" / "conv.pt").is_file()  # nothing deleted


def test_legacy_keys_with_the_device_stay_valid():
    from snnadv.config import settings_key
    from snnadv.reproduce import _keys

    settings = {"device": "auto", "seed": 0, "lr": 0.1}
    old = settings_key(settings, ["u"], volatile={"quiet", "out", "config", "resume", "stage"})  # how keys were made before
    assert old in _keys({**settings, "device": "cpu"}, ["u"])
    assert _keys({**settings, "device": "cpu"}, ["u"])[0] == _keys(settings, ["u"])[0]


def test_one_key_scheme_leaves_out_the_volatile_settings_and_keeps_older_keys():
    """reproduce and the sweeps key results with config.settings_key: download and force
    change no result, nor the key; a stage's key from before they were left out stays valid."""
    from snnadv.config import resolve, settings_key
    from snnadv.reproduce import LEGACY_VOLATILE, _keys

    cfg = resolve("analyze", flags={"seed": 1})
    assert settings_key({**cfg, "download": True, "force": True}, ["u"]) == settings_key(cfg, ["u"])
    assert settings_key(cfg, ["u"]) != settings_key({**cfg, "seed": 2}, ["u"]) != settings_key(cfg, ["v"])
    keys = _keys(cfg, ["u"])
    assert keys[0] == settings_key(cfg, ["u"]) and settings_key(cfg, ["u"], volatile=LEGACY_VOLATILE) in keys


def test_sweep_results_saved_with_the_old_signature_stay_valid(tmp_path):
    from snnadv.analysis.sweep import _saved, _signature

    settings = {"model": "snn-conv", "bits": 4, "timesteps": 8, "leak": 1.0, "eval": {"seed": 0}, "finetune": None}
    inputs = {"checkpoint": "a" * 64, "source": "b" * 64}
    old = hashlib.sha256(json.dumps([settings, inputs], sort_keys=True, default=str).encode()).hexdigest()  # before
    rec = tmp_path / "setting.json"
    for sig in (old, _signature(settings, inputs)):
        rec.write_text(json.dumps({"complete": True, "signature": sig}))
        assert _saved(rec, settings, inputs) is not None
        assert _saved(rec, {**settings, "timesteps": 16}, inputs) is None
        assert _saved(rec, settings, {**inputs, "source": "c" * 64}) is None


# --------------------------------------------------------------------------- item 14: progress in logs
def test_progress_lines_when_the_output_is_not_a_terminal(shared_data, tmp_path):
    env = {**ENV, "SNNADV_PROGRESS_EVERY": "0.2"}
    proc = subprocess.run(SNNADV + ["train-ann", "--arch", "tiny", "--epochs", "1", "--out", str(tmp_path / "a.pt"),
                                    "--data-dir", str(shared_data), "--device", "cpu", "--train-subset", "1000",
                                    "--test-subset", "20"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [l for l in proc.stdout.splitlines() if l.startswith("epoch 1/1:")]
    assert lines and "elapsed" in lines[-1] and "/16" in lines[-1], proc.stdout
    assert "\x1b[" not in proc.stdout  # plain text


def test_reporter_progress_interval_is_a_parameter():
    import io

    from rich.console import Console

    from snnadv.report import Reporter

    buf = io.StringIO()
    r = Reporter(console=Console(file=buf, force_terminal=False, width=200), progress_every=0.05)
    with r.progress("evaluating", 4) as advance:
        for i in range(4):
            time.sleep(0.12)
            advance(1, info=f"attack {i}")
    lines = buf.getvalue().splitlines()
    assert len(lines) >= 3 and all(l.startswith("evaluating: ") for l in lines), lines
    assert "left" in lines[-1] and "(attack" in lines[-1]
    buf2 = io.StringIO()
    quiet = Reporter(console=Console(file=buf2, force_terminal=False), progress_every=60)
    with quiet.progress("x", 2) as advance:
        advance(2)
    assert buf2.getvalue() == ""  # at most one line per interval


def test_reproduce_keeps_the_old_model_until_the_new_one_has_an_epoch(tmp_path, shared_data, monkeypatch):
    """A changed [train-ann] re-runs the ANN; Ctrl-C in its first epoch leaves the old one."""
    import snnadv.train
    from snnadv.reproduce import reproduce

    cfg = _config(tmp_path, shared_data)
    run_dir = tmp_path / "run"
    reproduce(cfg, run_dir, max_stages=1, quiet=True)
    before = _snapshot(run_dir / "models")
    cfg2 = tmp_path / "changed.toml"
    cfg2.write_text(cfg.read_text().replace("lr = 0.05", "lr = 0.04"))

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(snnadv.train, "fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        reproduce(cfg2, run_dir, max_stages=1, quiet=True)
    assert _snapshot(run_dir / "models") == before
