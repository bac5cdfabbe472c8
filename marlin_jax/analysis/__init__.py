"""Feature analysis on MARLIN features.

Statistics between two groups of feature files (:mod:`.stats`, :mod:`.groups`, :mod:`.plots`,
:mod:`.report`, CLI in ``__main__``; numpy/scipy, no JAX; imports flow
``__main__ -> report -> stats``)::

    python -m marlin_jax.extract --model marlin_vit_base_ytf --checkpoint C videos/ --output_dir F
    python -m marlin_jax.analysis --features_dir F --meta meta.xlsx --group_column outcome \
        --output_dir report/                      # or: --pre_dir F1 --post_dir F2
        [--levels clip video paired] [--alpha 0.05] [--top_k 20] [--embeddings pca umap tsne]

(``python -m marlin_jax.analysis.stats ...`` runs the same CLI.) Per feature: Mann-Whitney U
(scipy.stats.mannwhitneyu), Benjamini-Hochberg q-values (scipy.stats.false_discovery_control),
Cohen's d (pooled SD), counts before/after correction and by |d| band, top-k; per level: an
RBF-kernel MMD test with a permutation p-value. Levels: ``clip`` (every clip a sample: p-values
overstate significance when a video's clips are not independent, which the report says),
``video`` (mean over each video's clips) and ``paired`` (ids present in both groups: Wilcoxon
signed-rank, Cohen's d_z). Output: ``report.md``,
``summary.json``, ``features_<level>.csv`` and ``plots/`` (top-feature distributions,
difference heat maps, PCA/UMAP/t-SNE).

Grad-CAM heat maps of feature dimensions (:mod:`.heatmap`; JAX)::

    python -m marlin_jax.analysis.visualize --checkpoint C --model marlin_vit_base_ytf \
        --video V.mp4 --features 397 231 490 --output_dir O [--windows all] [--skip_comparison_video] [--fps 30]
    python -m marlin_jax.analysis.compare --checkpoint C --pre A.mp4 --post B.mp4 \
        --features 397 231 --output_dir O      # four rows: pre/post frames and heat maps
    # --top_features_from report/summary.json takes the features a statistics report ranked

Submodules are imported on use, so the statistics never import JAX.
"""
