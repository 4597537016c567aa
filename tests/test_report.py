"""Report plots of a large sweep stay readable: the best trials named, the rest grey, a bounded panel grid."""

from PIL import Image

from orchestrator.report import MAX_PANELS, TrialResult, plot_train_vs_val, plot_val_vs_tokens


def trials(n: int) -> list[TrialResult]:
    return [
        TrialResult(
            name=f"{i:03d}_stride=32_pos_emb=sinusoidal_freeze_token_embeddings=True_lr=0.0005",
            run_id=str(i),
            status="finished",
            params={},
            best_val_loss=7.0 + i / 10,
            curves={
                "tokens_seen": [(s, s * 512.0) for s in (10, 20, 30)],
                "val_loss": [(s, 9.0 - s / 10 + i / 10) for s in (10, 20, 30)],
                "train_loss": [(s, 8.5 - s / 10 + i / 10) for s in (10, 20, 30)],
            },
        )
        for i in range(n)
    ]


def test_large_sweep_plots_are_bounded(tmp_path):
    small = Image.open(plot_val_vs_tokens(trials(3), tmp_path / "small.png", "3 trials"))
    large = Image.open(plot_val_vs_tokens(trials(36), tmp_path / "large.png", "36 trials"))
    assert large.width > small.width  # the legend moves beside the axes instead of over them
    panels = Image.open(plot_train_vs_val(trials(36), tmp_path / "panels.png", "36 trials"))
    few = Image.open(plot_train_vs_val(trials(MAX_PANELS), tmp_path / "few.png", "9 trials"))
    assert panels.size == few.size  # 36 trials draw the best 9 panels, not 12 rows of 3
