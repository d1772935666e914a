"""The paper's comparisons on the reference recipe: every model original vs lowlevel
(paper_table; docs/paper_table.md), each model learns (zoo_smoke; docs/zoo.md), which decoder
inputs carry the segmentation (feature_importance), and a classical baseline (otsu_baseline)."""
