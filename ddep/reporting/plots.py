"""The paper's figures from finished runs: tables as images, mIoU against label fraction
(Figures 2, 5, 6), training curves, the denoising grid (Figure 4) and pretraining
validation curves. Matplotlib, headless."""

from __future__ import annotations

import io
import math
import re
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use('Agg')  # Headless: runs on training hosts without a display.
import matplotlib.pyplot as plt  # noqa: E402

from ddep.reporting import records  # noqa: E402
from ddep.reporting import tables  # noqa: E402
from ddep.reporting import visualisation  # noqa: E402
from ddep.runs import storage  # noqa: E402


def slug(text: str) -> str:
  return re.sub(r'[^A-Za-z0-9._-]+', '_', text).strip('_')


def plot_table(summary: Mapping[tuple, tables.Cell], dataset: str, width: float, path) -> None:
  group = tables.groups(summary)[(dataset, width)]
  cells = [
      [tables.format_cell(summary.get((dataset, width, m, f))) for f in group['fractions']]
      for m in group['methods']
  ]
  fig, ax = plt.subplots(figsize=(2 + 2.2 * len(group['fractions']), 1 + 0.45 * len(cells)))
  ax.axis('off')
  table = ax.table(
      cellText=cells,
      rowLabels=[tables.method_label(m) for m in group['methods']],
      colLabels=[tables.format_labels(f) for f in group['fractions']],
      loc='center',
  )
  table.auto_set_font_size(False)
  table.set_fontsize(9)
  table.scale(1, 1.4)
  ax.set_title(f'{tables.group_title(dataset, width)}: mIoU (%)')
  save_figure(fig, path, dpi=100, bbox_inches='tight')


def plot_miou_vs_fraction(
    summary: Mapping[tuple, tables.Cell], dataset: str, width: float, path
) -> None:
  """Figures 2, 5, 6: mIoU against label fraction (log x), one line per method."""
  group = tables.groups(summary)[(dataset, width)]
  columns = sorted(group['fractions'], key=records.fraction_of)  # Counts at their true fraction.
  fig, ax = plt.subplots(figsize=(6, 4.2))
  for method in group['methods']:
    points = [
        (f, summary[(dataset, width, method, f)])
        for f in columns
        if (dataset, width, method, f) in summary
    ]
    fractions = [records.fraction_of(f) for f, _ in points]
    means = [100 * c.mean for _, c in points]
    stds = [0.0 if math.isnan(c.std) else 100 * c.std for _, c in points]
    ax.errorbar(
        fractions, means, yerr=stds, marker='o', capsize=3, label=tables.method_label(method)
    )
  ax.set_xscale('log')
  ax.set_xticks([records.fraction_of(f) for f in columns])
  ax.set_xticklabels([tables.format_labels(f) for f in columns])
  ax.minorticks_off()
  ax.set_xlabel('fraction of labelled training images')
  ax.set_ylabel('mIoU (%)')
  ax.set_title(tables.group_title(dataset, width))
  ax.grid(alpha=0.3)
  ax.legend()
  save_figure(fig, path, dpi=100, bbox_inches='tight')


def plot_training_curves(run: records.Run, path) -> bool:
  """One panel per logged metric against step; False if there is nothing to plot."""
  series: dict[str, tuple[list, list]] = {}
  for row in run.curves:
    for key, value in row.items():
      if (
          key != 'step'
          and isinstance(value, (int, float))
          and not isinstance(value, bool)
          and math.isfinite(value)
      ):
        steps, values = series.setdefault(key, ([], []))
        steps.append(row['step'])
        values.append(value)
  if not series:
    return False
  cols = min(3, len(series))
  rows = math.ceil(len(series) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
  for ax, (key, (steps, values)) in zip(axes.flat, sorted(series.items())):
    ax.plot(steps, values, marker='.' if len(steps) < 30 else None)
    ax.set_title(key)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(series) :]:
    ax.axis('off')
  fig.suptitle(run.name)
  fig.tight_layout()
  save_figure(fig, path, dpi=80)
  return True


def denoising_grid(
    clean,
    noisy_by_sigma: Mapping[float, Any],
    predicted_noise_by_sigma: Mapping[float, Any],
    denoised_by_sigma: Mapping[float, Any],
    *,
    path=None,
    noise_scale: float = 3.0,
    title: str = '',
) -> bytes:
  """Figure 4: per σ, a row clean | noisy x+σε | predicted ε | denoised.

  Images are (H, W, 3) or (H, W) in [-1, 1] and are shown clipped to [0, 1]
  after mapping. ε ~ N(0, I) is not bounded, so the predicted noise is
  shown with ±noise_scale mapped to [0, 1]. Returns the PNG bytes and writes
  them to `path` if given.
  """
  sigmas = sorted(noisy_by_sigma)
  for name, images in (
      ('predicted_noise_by_sigma', predicted_noise_by_sigma),
      ('denoised_by_sigma', denoised_by_sigma),
  ):
    if sorted(images) != sigmas:
      raise ValueError(f'{name} has σ {sorted(images)}, noisy_by_sigma has {sigmas}')
  columns = ('clean', 'noisy', 'predicted noise', 'denoised')
  fig, axes = plt.subplots(len(sigmas), 4, figsize=(8, 2.1 * len(sigmas)), squeeze=False)
  for row, sigma in enumerate(sigmas):
    images = (
        visualisation.to_display(clean),
        visualisation.to_display(noisy_by_sigma[sigma]),
        visualisation.to_display(predicted_noise_by_sigma[sigma], noise_scale),
        visualisation.to_display(denoised_by_sigma[sigma]),
    )
    for col, image in enumerate(images):
      ax = axes[row, col]
      ax.imshow(
          image, cmap='gray' if image.ndim == 2 else None, vmin=0, vmax=1, interpolation='nearest'
      )
      ax.set_xticks([])
      ax.set_yticks([])
      if row == 0:
        ax.set_title(columns[col])
    axes[row, 0].set_ylabel(f'σ = {sigma:g}')
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=100)
  plt.close(fig)
  data = buffer.getvalue()
  if path is not None:
    storage.path(path).write_bytes(data)
  return data


def save_figure(fig, path, **savefig_kw) -> None:
  """PNG bytes through the storage layer: matplotlib would open() a gs:// path locally."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', **savefig_kw)
  plt.close(fig)
  storage.path(path).write_bytes(buffer.getvalue())


def plot_denoise_validation(data: Sequence[Mapping[str, Any]], path) -> bool:
  """One panel per held-out metric against step, a line per run; False if none has it."""
  if not any(d[key] for d in data for key, _ in records.DENOISE_VALIDATION):
    return False
  fig, axes = plt.subplots(1, len(records.DENOISE_VALIDATION), figsize=(11, 4), squeeze=False)
  for ax, (key, title) in zip(axes[0], records.DENOISE_VALIDATION):
    for run in data:
      if run[key]:
        steps, values = zip(*run[key])
        ax.plot(steps, values, marker='.' if len(steps) < 30 else None, label=run['label'])
    ax.set_title(title)
    ax.set_xlabel('pretraining step')
    ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize='small')
  fig.tight_layout()
  save_figure(fig, path, dpi=100)
  return True
