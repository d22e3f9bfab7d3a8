"""Evaluation components: prompt sets, bootstrap statistics and win rates, the report schema, report building
(JSON, markdown, grids, charts) and the implicit-reward accuracy. Recipes (evaluate, demo) compose them."""
