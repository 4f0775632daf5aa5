"""What the plots share: matplotlib on the Agg backend (files only), the resolution of the PNGs
and the colour and marker of each trial status."""

from __future__ import annotations

DPI = 110                      # 8 x 4.5 in -> 880 x 495 px
STATUS_STYLE = {  # status -> (colour, end-of-curve marker, legend text)
    "completed": ("tab:blue", "o", "completed (all epochs)"),
    "early_stopped": ("tab:red", "x", "stopped early by ASHA"),
    "diverged": ("tab:gray", "v", "diverged (NaN/inf loss)"),
    "errored": ("black", "v", "errored"),
}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: never a window, works without a display
    import matplotlib.pyplot as plt

    return plt
