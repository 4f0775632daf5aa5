"""Which figures the report holds, in order, with their captions, and drawing them all to
RUN_DIR/report/*.png. Each plot is a function of the run returning a matplotlib figure (None:
nothing to draw); one that fails or has nothing to draw becomes a note instead."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import optuna

from .curves import plot_best_vs_epochs, plot_best_vs_time, plot_learning_curves
from .front import has_front, plot_front
from .model import plot_confusion, plot_refit, plot_test_images
from .params import plot_importance, plot_parallel, plot_slices
from .run import REPORT_DIR, Run
from .style import DPI, pyplot


@dataclass(frozen=True)
class Plot:
    file: str
    caption: str
    draw: Callable
    applies: Callable = lambda run: True  # False: a plot this kind of run never has, left out without a note


def plots(study: optuna.Study) -> list[Plot]:
    return [
        Plot("learning_curves.png", "Validation accuracy per epoch of every trial (with more than 25, the "
               "best 20 in colour, the others grey); a cross marks where ASHA stopped a trial, a circle a "
               "trial that ran all its epochs.", plot_learning_curves),
        Plot("best_vs_time.png", "Best validation accuracy found so far against wall-clock time.",
               plot_best_vs_time),
        Plot("best_vs_epochs.png", "Best validation accuracy found so far against the epochs spent by all "
               "trials together; the dashed line is what the trials would have cost without early stopping.",
               plot_best_vs_epochs),
        Plot("pareto_front.png", "Several objectives: each trial's best validation score against its second "
               "objective (or constrained metric); the red staircase joins the Pareto front (the trials no other "
               "beats on every objective; [N] is the index for refit --pick N), the star marks the refit's pick, "
               "grey dots fail the constraints.", plot_front, applies=has_front),
        Plot("importance.png", "Hyperparameter importance from Optuna's evaluators, on the trials' best "
               "validation scores.", lambda run: plot_importance(run, study)),
        Plot("parallel_coordinates.png", "Parallel coordinates (Optuna): each line one trial (with more than "
               "100, the best 100).",
               lambda run: plot_parallel(run, study)),
        Plot("slices.png", "Each trial's best score against each hyperparameter.", plot_slices),
        Plot("refit_curves.png", "The refit of the best configuration on train + validation.", plot_refit),
        Plot("confusion_matrix.png", "Confusion matrix of the refit model on the test split.", plot_confusion),
        Plot("test_images.png", "Test images with predicted and true labels, mistakes first.", plot_test_images),
    ]


def draw_figures(run: Run, study: optuna.Study) -> tuple[list[Plot], list[str]]:
    """Write every figure that applies to RUN_DIR/report/; (drawn, notes on the ones left out)."""
    out = run.folder / REPORT_DIR
    out.mkdir(exist_ok=True)
    drawn, notes = [], []
    plt = pyplot()
    for figure in plots(study):
        (out / figure.file).unlink(missing_ok=True)  # no stale plot from an earlier report
        if not figure.applies(run):
            continue
        try:
            fig = figure.draw(run)
        except Exception as error:  # one plot that fails must not cost the others
            notes.append(f"{figure.file}: not drawn ({type(error).__name__}: {str(error).strip()[:200]})")
            continue
        if fig is None:
            notes.append(f"{figure.file}: nothing to draw for this run")
            continue
        fig.savefig(out / figure.file, dpi=DPI, bbox_inches="tight")
        plt.close(fig)
        drawn.append(figure)
    return drawn, notes
