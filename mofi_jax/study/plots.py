"""The study's figures: training curves, mAP per model, and a t-SNE like the paper's Figure 5."""
import matplotlib

matplotlib.use('Agg')  # files only: no display on servers, CI or Colab kernels without one
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position


def curves(path, series, *, title, ylabel):
  """series: {label: [[(step, value)], ...one list per seed]}: mean line, min-max band."""
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for label, per_seed in series.items():
    per_seed = [s for s in per_seed if s]
    if not per_seed:
      continue
    n = min(len(s) for s in per_seed)
    steps = np.array([p[0] for p in per_seed[0][:n]])
    values = np.array([[p[1] for p in s[:n]] for s in per_seed])
    ax.plot(steps, values.mean(0), label=label)
    if len(values) > 1:
      ax.fill_between(steps, values.min(0), values.max(0), alpha=0.2)
  ax.set(xlabel='step', ylabel=ylabel, title=title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def bars(path, summary, metric, *, arm_order, title):
  """Mean ± std of `metric` per model, seeds as dots."""
  arms = [a for a in arm_order if a in summary and metric in summary[a]]
  means = [summary[a][metric][0] for a in arms]
  stds = [np.nan_to_num(summary[a][metric][1]) for a in arms]
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.bar(range(len(arms)), means, yerr=stds, capsize=4, color='tab:blue', alpha=0.8)
  ax.set_xticks(range(len(arms)), arms, rotation=20, ha='right')
  ax.set(ylabel=metric, title=title)
  for i, m in enumerate(means):
    ax.text(i, m, f'{m:.3f}', ha='center', va='bottom', fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def tsne_grid(path, embeddings, categories, domains, *, seed=0):
  """embeddings: {arm: [N, D]}; one row per arm: coloured by category, then by domain."""
  from sklearn.manifold import TSNE  # pylint: disable=g-import-not-at-top
  arms = list(embeddings)
  fig, axes = plt.subplots(len(arms), 2, figsize=(9, 4 * len(arms)), squeeze=False)
  domain_names = sorted(set(domains))
  domain_ids = np.array([domain_names.index(d) for d in domains])
  for row, arm in enumerate(arms):
    x = embeddings[arm]
    perplexity = float(min(30, max(2, (len(x) - 1) // 3)))
    xy = TSNE(2, perplexity=perplexity, init='pca', random_state=seed).fit_transform(x)
    axes[row, 0].scatter(xy[:, 0], xy[:, 1], c=categories, cmap='tab20', s=8)
    axes[row, 0].set_title(f'{arm}: by category')
    sc = axes[row, 1].scatter(xy[:, 0], xy[:, 1], c=domain_ids, cmap='tab10', s=8)
    axes[row, 1].set_title(f'{arm}: by domain')
    for ax in axes[row]:
      ax.set_xticks([])
      ax.set_yticks([])
  handles = [plt.Line2D([], [], marker='o', ls='', color=sc.cmap(sc.norm(i)), label=d)
             for i, d in enumerate(domain_names)]
  fig.legend(handles=handles, loc='lower center', ncol=min(8, len(handles)), fontsize=8)
  fig.tight_layout(rect=(0, 0.03, 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)
