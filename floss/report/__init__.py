"""The paper artifact's reporting layer: the paper's numbers (``paper``), side-by-side tables (``tables``),
deterministic figures (``plots``) and analyses of written results (``analysis``)."""
