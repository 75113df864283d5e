"""Training backend parity (torch vs DeepSpeed at world size 1), LR schedule and checkpoint resume."""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import pytest
import torch

from _train_helpers import TAGS, TinyTagger, make_split, write_code_pickle
from ramflow_io.formats import labels_path, list_shards
from ram_model.data import AugmentConfig, TrainLoader, index_shards, load_label_table
from ram_model.backends import WarmupCosine
from ram_model.trainer import TRAINER_STATE, Trainer, TrainStageConfig, latest_checkpoint, seed_everything

# Per-step loss tolerance between the two backends at world size 1. Both run torch's AdamW
# (DeepSpeed with torch_adam) on the same fp32 graph; measured difference is 0.0 on CPU.
PARITY_ATOL = 1e-6


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_split(root, "pretrain", [20, 20, 16])
    return root


def _cfg(**kw) -> TrainStageConfig:
    base = dict(model="ram_tiny", batch_size=8, micro_batch_size=4, lr=5e-2, warmup_steps=2, max_steps=6,
                checkpoint_every=3, num_workers=2, shuffle_buffer=8, seed=1, validation_fraction=0.0, backend="torch")
    base.update(kw)
    return TrainStageConfig(**base)


def _trainer(root, out_dir, cfg: TrainStageConfig, channels_last: bool = False) -> Trainer:
    seed_everything(cfg.seed)
    model = TinyTagger()
    if channels_last:  # as the small registry configs do (RamConfig.channels_last)
        model.conv1x1 = torch.nn.Conv2d(3, 3, 1)  # unused: a 1x1 weight has stride(-1) != 1 here
        model.to(memory_format=torch.channels_last)
        assert model.conv1x1.weight.stride(-1) != 1
    loader = TrainLoader(index_shards(list_shards(root, "pretrain")),
                         load_label_table(labels_path(root, "pretrain"), len(TAGS)), cfg.micro_batch_size,
                         AugmentConfig(image_size=16), seed=cfg.seed, num_workers=cfg.num_workers,
                         shuffle_buffer=cfg.shuffle_buffer)
    return Trainer(model, loader, cfg, out_dir)


def _losses(summary) -> np.ndarray:
    return np.array([h["loss"] for h in summary.history])


def test_warmup_cosine_schedule():
    f = WarmupCosine(warmup_steps=4, total_steps=12, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(12) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)
    vals = [f(s) for s in range(4, 13)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


@pytest.mark.slow  # first DeepSpeed init compiles a comm op
@pytest.mark.parametrize("channels_last", [False, True])
def test_torch_and_deepspeed_match_at_world_size_one(root, tmp_path, channels_last):
    """Same losses and LRs; with channels_last weights too (DeepSpeed needs them in the default
    layout to broadcast them, so its backend converts them: a different conv kernel order, hence
    the looser tolerance there)."""
    runs = {}
    for backend in ("torch", "deepspeed"):
        t = _trainer(root, tmp_path / backend, _cfg(backend=backend, zero_stage=0), channels_last)
        runs[backend] = t.fit()
        assert t.backend.kind == backend
    a, b = _losses(runs["torch"]), _losses(runs["deepspeed"])
    assert len(a) == len(b) == 6
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 if channels_last else PARITY_ATOL)
    lrs_t = [h["lr"] for h in runs["torch"].history]
    lrs_d = [h["lr"] for h in runs["deepspeed"].history]
    np.testing.assert_allclose(lrs_t, lrs_d, rtol=1e-12)
    assert lrs_t[0] == pytest.approx(0.025) and lrs_t[1] == pytest.approx(0.05) and lrs_t[-1] < lrs_t[2]


# DeepSpeed cases are in the slow tier: the first DeepSpeed backend of a session compiles a comm op
# (~2/3 of the unit tier's time on 2 cores); the torch cases check the same resume logic there.
DEEPSPEED = pytest.param("deepspeed", marks=pytest.mark.slow)


@pytest.mark.parametrize("backend", ["torch", DEEPSPEED])
def test_resume_after_interruption_gives_identical_losses_and_weights(root, tmp_path, backend):
    cfg = _cfg(backend=backend, zero_stage=2 if backend == "deepspeed" else 0, max_steps=8, checkpoint_every=4)
    straight = _trainer(root, tmp_path / "straight", cfg)
    full = straight.fit()
    # "killed" after step 5: the last checkpoint is step 4, steps 5.. are redone after the resume
    first = _trainer(root, tmp_path / "killed", cfg)
    part = first.fit(until_step=5)
    assert part.stopped_early and latest_checkpoint(tmp_path / "killed").state["step"] == 4
    del first
    torch.manual_seed(12345)  # scramble every RNG: the resume must restore them
    random.seed(6789)
    np.random.seed(42)
    second = _trainer(root, tmp_path / "killed", cfg)
    assert second.resume() and second.state.step == 4
    rest = second.fit()
    assert rest.steps == 8 and not rest.stopped_early
    np.testing.assert_allclose(_losses(rest), _losses(full), rtol=0, atol=1e-6)  # history restored + continued
    w1, w2 = straight.backend.module.state_dict(), second.backend.module.state_dict()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=1e-6)


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("backend,damage", [
    ("torch", "backend_state"), ("torch", "trainer_state"), ("torch", "rng_state"), ("torch", "pickled_code"),
    pytest.param("deepspeed", "backend_state", marks=pytest.mark.slow),
    pytest.param("deepspeed", "pickled_code", marks=pytest.mark.slow),
])
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(root, tmp_path, caplog, backend, damage):
    """Killed after step 5 with checkpoints at 2 and 4; step 4 is then truncated (or one of its
    files replaced by a pickle that runs code): the resume warns, takes step 2 and the run ends
    exactly as the uninterrupted one, without ever running the pickled code."""
    cfg = _cfg(backend=backend, zero_stage=2 if backend == "deepspeed" else 0, max_steps=8, checkpoint_every=2)
    straight = _trainer(root, tmp_path / "straight", cfg)
    full = straight.fit()
    first = _trainer(root, tmp_path / "killed", cfg)
    first.fit(until_step=5)
    del first
    step4 = tmp_path / "killed" / "checkpoints" / "step_00000004"
    backend_file = (step4 / "torch_backend.pt" if backend == "torch"
                   else next((step4 / "backend").glob("*optim_states.pt")))
    marker = tmp_path / "marker"
    if damage == "backend_state":
        _truncate(backend_file)
    elif damage == "trainer_state":
        _truncate(step4 / TRAINER_STATE)
    elif damage == "rng_state":
        _truncate(step4 / "rng_rank0.pt")
    else:
        write_code_pickle(backend_file, marker)
    torch.manual_seed(12345)  # scramble every RNG: the resume must restore them
    random.seed(6789)
    np.random.seed(42)
    second = _trainer(root, tmp_path / "killed", cfg)
    with caplog.at_level(logging.WARNING, logger="ram_model.trainer"):
        assert second.resume() and second.state.step == 2
    (warning,) = [r.getMessage() for r in caplog.records
                  if r.levelno == logging.WARNING and r.name == "ram_model.trainer"]
    assert "step_00000004" in warning and "falling back" in warning
    rest = second.fit()
    assert rest.steps == 8
    np.testing.assert_allclose(_losses(rest), _losses(full), rtol=0, atol=1e-6)
    w1, w2 = straight.backend.module.state_dict(), second.backend.module.state_dict()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=1e-6)
    names = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert names == ["corrupt-step_00000004", "latest.json", "step_00000006", "step_00000008"]
    assert not marker.exists()


def test_an_interrupted_save_leaves_the_previous_checkpoint_as_latest(root, tmp_path, monkeypatch):
    """A save killed half-way (backend state half written) publishes nothing: no step folder, the
    pointer unchanged, and the resume continues from the last complete checkpoint."""
    cfg = _cfg(max_steps=8, checkpoint_every=2)
    t = _trainer(root, tmp_path / "run", cfg)
    t.fit(until_step=2)
    real_save = t.backend.save

    def dies_half_way(ckpt_dir):
        real_save(ckpt_dir)
        _truncate(ckpt_dir / "torch_backend.pt")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(t.backend, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        t.fit(until_step=4)
    root_dir = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root_dir.glob("step_*")) == ["step_00000002"]
    assert latest_checkpoint(tmp_path / "run").state["step"] == 2
    again = _trainer(root, tmp_path / "run", cfg)
    assert again.resume() and again.state.step == 2
    assert again.fit().steps == 8
    assert sorted(p.name for p in root_dir.iterdir()) == ["latest.json", "step_00000006", "step_00000008"]


def test_keeps_at_least_two_checkpoints(root, tmp_path):
    t = _trainer(root, tmp_path / "run", _cfg(max_steps=6, checkpoint_every=2, keep_checkpoints=1))
    t.fit()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == [
        "step_00000004", "step_00000006"]


def test_checkpoints_every_n_steps_and_keeps_the_latest(root, tmp_path):
    t = _trainer(root, tmp_path / "run", _cfg(max_steps=6, checkpoint_every=2, keep_checkpoints=2))
    t.fit()
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert names == ["step_00000004", "step_00000006"]
    assert latest_checkpoint(tmp_path / "run").state["step"] == 6


def test_missing_label_rejection_starts_at_its_share_of_training(root, tmp_path):
    t = _trainer(root, tmp_path / "run", _cfg(max_steps=6, missing_label_rejection=0.2, reject_start=0.5))
    batch = next(iter(t.loader.iter_epoch(0)))
    rates = []
    for step in range(6):
        t.state.step = step
        rates.append(t._prepare(batch).get("reject_negatives", 0.0))
    assert rates == [0.0, 0.0, 0.0, 0.2, 0.2, 0.2]  # steps 3..5: from half of the 6 steps on
    off = _trainer(root, tmp_path / "off", _cfg(max_steps=6))
    off.state.step = 5
    assert "reject_negatives" not in off._prepare(batch)


def test_batch_size_must_split_into_micro_batches(root, tmp_path):
    with pytest.raises(ValueError, match="multiple"):
        _trainer(root, tmp_path, _cfg(batch_size=6, micro_batch_size=4))


def test_only_the_deepspeed_backend_imports_deepspeed():
    pkg = os.path.join(os.path.dirname(__file__), "..", "ram_model")
    offenders = []
    for dirpath, _, files in os.walk(pkg):
        for f in files:
            if f.endswith(".py") and f != "deepspeed_backend.py":
                text = open(os.path.join(dirpath, f), encoding="utf-8").read()
                if "import deepspeed" in text or "from deepspeed" in text:
                    offenders.append(f)
    assert offenders == []
