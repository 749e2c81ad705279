import pickle

import pytest
import torch
from torch.utils.data import Subset

from simprune.errors import SimpruneError
from simprune.io.data import DatasetInfo, ImageTensorDataset, load_dataset
from simprune.io.files import load_model, save_model
from simprune.models import build_model
from simprune.train.loop import TrainConfig, evaluate, lr_at, train
from tests.conftest import require_fashion_mnist


def test_lr_schedule_warmup_then_cosine():
    assert lr_at(0, 100, 10, 0.1) == pytest.approx(0.01)
    assert lr_at(9, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(55, 100, 10, 0.1) == pytest.approx(0.05)
    assert lr_at(100, 100, 10, 0.1) == pytest.approx(0.0)


def test_one_epoch_on_real_subset_lowers_loss():
    require_fashion_mnist()
    ds = load_dataset("fashion-mnist", "train", pad_to=32)
    subset = Subset(ds, range(512))
    model = build_model("resnet20", num_classes=10, in_channels=1)
    before = evaluate(model, subset)["loss"]
    train(model, subset, TrainConfig(epochs=1, batch_size=64, lr=0.05, warmup_epochs=0.1),
          progress=False, log=lambda s: None)
    after = evaluate(model, subset)["loss"]
    assert after < before * 0.8


def _tiny_dataset(n=64):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 32, 32), generator=g, dtype=torch.uint8)
    return ImageTensorDataset(images, torch.arange(n) % 10, DatasetInfo(10, 1, (0.5,), (0.25,)))


def test_checkpoint_save_load_equality(tmp_path):
    model = build_model("resnet20", num_classes=10, in_channels=1)
    train(model, _tiny_dataset(), TrainConfig(epochs=1, batch_size=32), progress=False, log=lambda s: None)
    model.eval()
    save_model(tmp_path, model, {"model": "resnet20", "model_args": {"num_classes": 10, "in_channels": 1}})
    loaded, desc = load_model(tmp_path)
    x = torch.randn(3, 1, 32, 32)
    assert torch.equal(model(x), loaded(x))
    assert desc["model"] == "resnet20" and "torch" in desc["versions"]


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    ds = _tiny_dataset()
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.02, bf16=False, channels_last=False)
    desc = {"model": "resnet20", "model_args": {"num_classes": 10, "in_channels": 1}}
    torch.manual_seed(1)
    full = build_model("resnet20", num_classes=10, in_channels=1)
    train(full, ds, cfg, tmp_path / "full", description=desc, progress=False, log=lambda s: None)

    class Killed(Exception):
        pass

    def die_after_first_epoch(line):
        raise Killed

    torch.manual_seed(1)
    cut = build_model("resnet20", num_classes=10, in_channels=1)
    with pytest.raises(Killed):
        train(cut, ds, cfg, tmp_path / "cut", description=desc, progress=False, log=die_after_first_epoch)
    assert (tmp_path / "cut" / "train_state.safetensors").exists()
    resumed = build_model("resnet20", num_classes=10, in_channels=1)
    history = train(resumed, ds, cfg, tmp_path / "cut", description=desc, resume=True, progress=False,
                    log=lambda s: None)
    assert [h["epoch"] for h in history] == [1, 2]
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_pickle_checkpoint_is_refused_without_running(tmp_path):
    class Payload:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {tmp_path}/pwned",))

    (tmp_path / "model.safetensors").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(SimpruneError, match="never unpickles"):
        load_model(tmp_path)
    assert not (tmp_path / "pwned").exists()
