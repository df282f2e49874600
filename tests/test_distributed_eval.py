"""Evaluation and attacks sharded over processes (gloo, 2 CPU processes) equal one process.

Each test spawns two processes that join a gloo process group, evaluate and attack a
tiny SNN on their shards of ten images in batches of 3, and gather the per-image
results; one process with batches of 4 (and another time chunking) must give the same
predictions, correctness, adversarial images and accuracy curves, exactly.  That holds
because the encoder's spikes (and PGD's random starts) are keyed by image index
(:func:`snnadv.encoding.encoder_keys`), not by batch position or process.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from snnadv import parallel
from snnadv.attacks import PGD, craft, make_attack
from snnadv.attacks.suite import correct_matrix, pgd_attack
from snnadv.evaluation import accuracy_on, correctness, curve_correctness, predictions
from snnadv.gradients import make_gradient
from snnadv.models import SNN, get_spec

EPS = 8 / 255
N = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _snn(T: int = 6, chunk_steps: int | None = None) -> SNN:
    torch.manual_seed(0)
    snn = SNN(get_spec("tiny", 10), num_steps=T, leak=0.95, chunk_steps=chunk_steps)
    snn.set_thresholds({n: 0.3 for n in snn.neuron_names})
    return snn.eval()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.rand(N, 3, 32, 32, generator=g), torch.randint(0, 10, (N,), generator=g)


def _compute(batch_size: int, chunk_steps: int | None) -> dict:
    """Everything compared: predictions and correctness over 2 draws, a keyed PGD with a
    random start and EOT 2 (Algorithm 1), the adaptive suite's best-of PGD with 2
    restarts chosen on 2 fixed draws, an accuracy curve, and an accuracy dict."""
    snn = _snn(chunk_steps=chunk_steps)
    x, y = _data()
    out = {"pred": predictions(snn, x, batch_size, 2, seed=5),
           "correct": correctness(snn, x, y, batch_size, 2, seed=5),
           "matrix": correct_matrix(snn, x, y, batch_size, 2, seed=5),
           "curve": curve_correctness(snn, x, y, [2, 6], batch_size, seed=3),
           "acc": accuracy_on(snn, x, y, batch_size, 2, seed=5, per_sample=True)}
    pgd = PGD(snn, EPS, 2 / 255, 2, random_start=True, gradient=make_gradient(snn, "alg1", eot=2))
    out["pgd"] = craft(pgd, x, y, batch_size, seed=11)
    out["best"] = pgd_attack(snn, make_gradient(snn, "bptt"), x, y, EPS, 2 / 255, 2, restarts=2,
                             batch_size=batch_size, seed=7, select_draws=2)
    out["pgd_correct"] = correctness(snn, out["pgd"], y, batch_size, 1, seed=5)
    return out


def _library() -> torch.Tensor:
    """torchattacks' APGD (its own random numbers per batch): batches of 5, which the two
    ranks' shards of 5 images make too."""
    pytest.importorskip("torchattacks")
    snn = _snn()
    x, y = _data()
    return craft(make_attack("apgd-ce", snn, EPS, steps=2, seed=0), x, y, 5, seed=13)


def _worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        w = parallel.world()
        assert (w.rank, w.size) == (rank, 2)
        out = _compute(batch_size=3, chunk_steps=None)
        try:
            out["apgd"] = _library()
        except pytest.skip.Exception:
            pass
        torch.save(out, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_two_gloo_processes_equal_one_process(tmp_path):
    one = _compute(batch_size=4, chunk_steps=4)  # other batches and time chunks than the ranks'
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    _same(ranks[0], ranks[1])  # every rank holds the whole gathered result
    if "apgd" in ranks[0]:  # the same batches: the same result
        assert torch.equal(ranks[0].pop("apgd"), _library())
        ranks[1].pop("apgd")
    _same(one, ranks[0])
    assert one["pred"].shape == (2, N) and one["pgd"].shape == (N, 3, 32, 32)
    # not trivially equal: the draws differ, and the attacks moved the images within the ball
    assert not torch.equal(one["pred"][0], one["pred"][1])
    for k in ("pgd", "best"):
        d = (one[k] - _data()[0]).abs()
        assert d.amax() <= EPS + 1e-6 and d.amax() > EPS / 2


def test_one_process_results_do_not_depend_on_batch_size_or_chunks():
    a, b = _compute(batch_size=N, chunk_steps=None), _compute(batch_size=1, chunk_steps=1)
    _same(a, b)


def _tiny_checkpoint(path: Path, stage: str = "snn-conv", seed: int = 0) -> Path:
    """A checkpoint of a tiny model with random weights (an SNN with low thresholds)."""
    from snnadv.checkpoint import model_settings, save_checkpoint, weights
    from snnadv.models import ANN

    if stage == "ann":
        torch.manual_seed(seed)
        model = ANN(get_spec("tiny", 10))
    else:
        model = _snn()
        if seed:
            torch.manual_seed(seed)
            model = SNN(get_spec("tiny", 10), num_steps=6, leak=0.95)
            model.set_thresholds({n: 0.3 for n in model.neuron_names})
    return save_checkpoint(path, {"stage": stage, "dataset": "cifar10", "spec": model.spec.to_dict(),
                                  "model": model_settings(model), "state_dict": weights(model), "config": {},
                                  "metrics": {}, "parent": None, "train_state": None})


def _table_config(folder: Path) -> Path:
    """A config naming the table's six checkpoints (tiny random models, two seeds)."""
    lines = ["[table]"]
    for role, stage in (("ann", "ann"), ("snn_conv", "snn-conv"), ("snn_bp", "snn-bp")):
        for suffix, seed in (("", 1), ("_ii", 2)):
            path = _tiny_checkpoint(folder / f"{role}{suffix}.pt", stage, seed)
            lines.append(f'{role}{suffix} = "{path}"')
    cfg = folder / "table.toml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


#: the command line of each stage, what its JSON must share with one process's, and a line of its table
CLI = {
    "attack": (["--source", "snn-conv", "--source-ckpt", "{ckpt}", "--attack", "pgd", "--steps", "2",
                "--random-start", "--eot", "2", "--eval-draws", "2"],
               ("clean_acc", "adv_acc", "max_linf", "adv_minus_clean", "images", "gradient", "mode"), "whitebox PGD"),
    "evaluate": (["--target-ckpt", "{ckpt}", "--suite", "adaptive", "--paths", "alg1", "--steps", "2",
                  "--restarts", "2", "--eot", "2", "--eval-draws", "2", "--no-library"],
                 ("clean", "worst_case", "eps", "images", "flags"), "Robustness of"),
    "table": (["--config", "{config}", "--steps", "2", "--eval-draws", "2"],
              ("table1", "table2", "comparisons", "images"), "Table 1: clean and adversarial"),
}


@pytest.mark.parametrize("stage", list(CLI))
def test_cli_under_torchrun_writes_what_one_process_writes(stage, tmp_path, shared_data):
    """``torchrun --nproc-per-node 2 snnadv attack|evaluate|table ...`` (gloo on the CPU) writes the
    JSON a single process writes (timings and output paths aside), and prints once."""
    script = shutil.which("snnadv") or str(Path(sys.executable).parent / "snnadv")
    if not Path(script).is_file():
        pytest.skip("the snnadv command is not installed")
    ckpt = _tiny_checkpoint(tmp_path / "snn.pt")
    config = _table_config(tmp_path) if stage == "table" else None
    options, same, title = CLI[stage]
    args = [stage, "--data-dir", str(shared_data), "--device", "cpu", "--test-subset", "10", "--seed", "3",
            *(["--timesteps", "6"] if stage != "table" else []), *[a.format(ckpt=ckpt, config=config) for a in options]]
    from snnadv.cli.main import main

    one, two = (tmp_path / (f"{n}.json" if stage != "table" else n) for n in ("one", "two"))
    assert main([*args, "--quiet", "--batch-size", "4", "--out", str(one)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), script, *args,
                          "--batch-size", "3", "--out", str(two)],
                         env=env, timeout=300, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count(title) == 1  # one process group: rank 0 alone prints the table
    if stage == "table":
        one, two = one / "tables.json", two / "tables.json"
        assert not list((tmp_path / "two" / "pieces").glob("*.tmp*"))
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    for k in same:
        assert a[k] == b[k], k
    if stage == "attack":
        assert len(a["adv_acc"]["correct"]) == 2 and len(a["adv_acc"]["correct"][0]) == 10
    elif stage == "table":
        assert len(a["table1"]["clean"]["snn_bp"]["correct"][0]) == 10
    else:
        assert [r["acc"] for r in a["rows"]] == [r["acc"] for r in b["rows"]]
        assert [r["max_linf"] for r in a["rows"]] == [r["max_linf"] for r in b["rows"]]
        assert a["gradient_stats"] == b["gradient_stats"]


# --------------------------------------------------------------------------- the cascade
def _cascade_attacks(snn, library: bool) -> list:
    """torchattacks' APGD (seeded per batch), FGSM, PGD with EOT 2, restarts and early exit (keyed)."""
    from snnadv.attacks.pgd import PGD as _PGD
    from snnadv.eot import BatchedEOT

    out = [(("apgd-ce",), lambda e: make_attack("apgd-ce", snn, e, steps=2, seed=0))] if library else []
    src = BatchedEOT(make_gradient(snn, "alg1"), 2, snn)
    return out + [(("fgsm",), lambda e: make_attack("fgsm", snn, e, gradient=make_gradient(snn, "alg1"))),
                  (("pgd", "early-exit"), lambda e: _PGD(snn, e, e / 4, 3, gradient=src, restarts=2, keep_best=True,
                                                         early_exit=True))]


def _cascade(library: bool, store=None) -> dict:
    """A cascade over two small eps (the tiny SNN is fragile) in pieces of 5 images, batches
    of 3; labels: the model's own predictions on the first evaluation draw, every third one
    another class."""
    from snnadv.attacks.cascade import run_cascade

    snn = _snn()
    x, _ = _data()
    y = predictions(snn, x, draws=1, seed=4, sharded=False)[0]
    y[::3] = (y[::3] + 1) % 10
    run = run_cascade(snn, x, y, _cascade_attacks(snn, library), [0.5 / 255, 1 / 255], draws=2, seed=4,
                      batch_size=3, chunk=5, store=store)
    keys = list(run.matrices)
    return {"clean": run.clean, "worst": torch.stack(run.worst),
            **{f"matrix {k}": torch.stack(run.matrices[k]) for k in keys},
            **{f"cumulative {k}": torch.stack(run.cumulative[k]) for k in keys},
            "attacked": [run.attacked[k] for k in keys], "pieces": run.pieces, "resumed": run.resumed}


def _cascade_worker(rank: int, port: int, folder: str, library: bool) -> None:
    from snnadv.adaptive import PieceStore

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        store = PieceStore(Path(folder) / "pieces", {"test": "cascade"})
        first = _cascade(library, store)
        saved = store.saved
        parallel.barrier()
        again = _cascade(library, PieceStore(Path(folder) / "pieces", {"test": "cascade"}))
        torch.save({"first": first, "saved": saved, "again": again}, Path(folder) / f"cascade{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_cascade_sharded_over_two_gloo_processes_equals_one_process(tmp_path):
    """run_cascade on 2 ranks: each attacks and evaluates its part of every piece, the pieces
    are gathered in order; per-sample worst case, every attack's matrix and the images
    attacked equal one process's (the keyed attacks sharded by image, APGD by whole
    batches), and rank 0 alone writes the pieces, which a second run reads back."""
    from importlib.util import find_spec

    library = find_spec("torchattacks") is not None
    one = _cascade(library)
    mp.spawn(_cascade_worker, args=(_free_port(), str(tmp_path), library), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"cascade{r}.pt", weights_only=False) for r in range(2)]
    for r in ranks:
        _same(r["first"], one)
        counts = {"pieces": 0, "resumed": 0, "attacked": 0}
        _same({**r["again"], **counts}, {**one, **counts})
        assert r["again"]["pieces"] == 0 and r["again"]["resumed"] == one["pieces"]  # all read back
    assert ranks[0]["saved"] == one["pieces"] > 0 and ranks[1]["saved"] == 0  # rank 0 alone writes
    assert len(list((tmp_path / "pieces").glob("*.pt"))) == one["pieces"]
    # the attacks did something, and the cascade dropped the fallen
    assert one["clean"].any(0).sum() >= 5 and not torch.equal(one["worst"][-1], one["clean"])
    assert one["attacked"][0][1] > one["attacked"][-1][1] > 0
