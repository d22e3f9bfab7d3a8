"""The demo's shapes world and its scorer, kept together: ``world`` generates scenes and their prompts
("a large red circle on a blue background"), ``scorer`` measures from pixels how well an image shows what
its prompt asks for. Registered as ``load_scorer("shapes")``; needs no weights."""

from scorers.shapes.scorer import ShapesScorer as ShapesScorer
