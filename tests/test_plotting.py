import struct
import zlib

from lightning_peft.cli.curves import COLORS, write_curves


def _decode(png: bytes) -> tuple[int, int, list[bytes]]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind, data = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", data[:8])
        elif kind == b"IDAT":
            idat += data
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = 1 + 3 * width
    return width, height, [raw[r * stride + 1 : (r + 1) * stride] for r in range(height)]


def test_write_curves_draws_each_series_in_its_color(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text(
        "epoch,step,train_loss,val_loss,val_acc\n"
        "0,0,2.0,,\n0,1,1.5,,\n0,1,,1.8,0.4\n1,2,1.0,,\n1,3,0.8,,\n1,3,,1.2,0.7\n"
    )
    width, height, rows = _decode(write_curves(csv, tmp_path / "curves.png").read_bytes())
    assert (width, height) == (480, 320)
    assert all(len(r) == 3 * width for r in rows)
    image = b"".join(rows)
    for name in ("train_loss", "val_loss", "val_acc"):
        assert bytes(COLORS[name]) in image, name


def test_fit_with_early_stopping_stops_keeps_best_adapter_only_checkpoint_and_writes_curves(tmp_path):
    import json
    import subprocess
    import sys

    import torch

    run = tmp_path / "run"
    subprocess.run(
        [sys.executable, "-m", "lightning_peft.cli.main", "fit", "experiment=tiny_llama_lora",
         "trainer.enable_progress_bar=false", "callbacks=early_stopping", "trainer.max_epochs=6",
         "callbacks.early_stopping.patience=1", "callbacks.early_stopping.min_delta=100",
         f"hydra.run.dir={run}"],
        cwd=tmp_path, check=True, capture_output=True,
    )  # fmt: skip
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (best,) = [p for p in (run / "checkpoints").glob("*.ckpt") if p.name != "last-adapter.ckpt"]
    ckpt = torch.load(best, map_location="cpu", weights_only=False)
    assert ckpt["epoch"] < 5  # stopped early: no epoch improves val_loss by min_delta=100
    assert all(k.rsplit(".", 1)[-1] in {"lora_A", "lora_B"} for k in ckpt["state_dict"])
    val = [float(r.split(",")[i]) for h, *rows in [(run / "logs/version_0/metrics.csv").read_text().splitlines()]
           for i in [h.split(",").index("val_loss")] for r in rows if r.split(",")[i]]  # fmt: skip
    assert f"val_loss{min(val):.4f}" in best.name
    assert json.loads((run / "metrics.json").read_text())["metrics"]["global_step"] > 0


def test_bar_lengths_are_proportional_to_the_values():
    from lightning_peft.cli.curves import render_bars

    blue, orange = (31, 119, 180), (255, 127, 14)
    png = render_bars("T", [("A", [1.0, 2.0]), ("B", [0.5, None])], [("X", blue), ("Y", orange)])
    width, height, rows = _decode(png)

    def run_of(color: tuple[int, int, int]) -> list[int]:
        """Length of the longest horizontal run of ``color`` in each row that has one."""
        pixel = bytes(color)
        lengths = []
        for row in rows:
            xs = [x for x in range(width) if row[3 * x : 3 * x + 3] == pixel]
            if len(xs) > 20:  # a bar, not a legend box
                lengths.append(len(xs))
        return sorted(set(lengths))

    blue_runs, orange_runs = run_of(blue), run_of(orange)  # (the dashed line may cut a pixel off)
    short, long, orange_bar = min(blue_runs), max(blue_runs), max(orange_runs)
    assert abs(long / short - 2.0) < 0.05  # 1.0 vs 0.5
    assert abs(orange_bar / long - 2.0) < 0.05  # 2.0 vs 1.0
    assert orange_bar - min(orange_runs) <= 1  # one orange bar only: B has no second value
