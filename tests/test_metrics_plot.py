"""scripts/plot_run.py: reads back exactly what was written to the event files and draws a PNG; bad paths
are one line and exit 2."""

import struct

import pytest
from torch.utils.tensorboard import SummaryWriter

from scripts import plot_run


def write_run(folder):
    writer = SummaryWriter(log_dir=str(folder))
    for step in (1, 10, 20):
        writer.add_scalar("loss/train", 10.0 - step / 4, step)
        writer.add_scalar("throughput/tokens_per_s_per_device", 1000.0 + step, step)
        writer.add_scalar("throughput/mfu", 0.3, step)
        writer.add_scalar("optim/lr", 1e-3 * step, step)
        writer.add_scalar("optim/grad_norm", 2.0, step)
    for step in (10, 20):
        writer.add_scalar("validation/loss", 9.0 - step / 10, step)
        writer.add_scalar("validation/stderr", 0.25, step)
        for b in range(10):
            writer.add_scalar(f"loss_by_t/validation_t{b / 10:.1f}-{(b + 1) / 10:.1f}", 8.0 + b / 10, step)
    writer.add_scalar("loss/train", 4.5, 20)  # a resumed run rewrites step 20: the last value wins
    writer.close()


def test_read_scalars_round_trip(tmp_path):
    write_run(tmp_path / "tb")
    folder = plot_run.find_event_folder(tmp_path)  # a dump folder resolves to its tb folder
    assert folder == tmp_path / "tb"
    series = plot_run.read_scalars(folder)
    assert series["loss/train"] == [(1, 9.75), (10, 7.5), (20, 4.5)]
    assert series["validation/loss"] == [(10, 8.0), (20, 7.0)]
    assert len([t for t in series if t.startswith("loss_by_t/validation_t")]) == 10
    assert plot_run._t_buckets(series, "loss_by_t/validation_t")[0] == (0.05, "loss_by_t/validation_t0.0-0.1")


@pytest.mark.slow
def test_main_writes_a_png(tmp_path, capsys):
    write_run(tmp_path / "tb")
    assert plot_run.main([str(tmp_path), "--title", "t"]) == 0
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])  # IHDR
    assert (width, height) == (12 * 110, 8 * 110)
    assert f"wrote {tmp_path / 'curves.png'}" in capsys.readouterr().out


def test_missing_event_files_exit_2(tmp_path, capsys):
    assert plot_run.main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no TensorBoard event files in")
