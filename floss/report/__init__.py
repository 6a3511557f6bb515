"""Layer 6, the paper artifact's reporting: the paper's numbers (``paper``), side-by-side tables (``tables``),
deterministic figures (``plots``), analyses of written results (``analysis``), the README's generated blocks
(``readme``) and the warm-kernel notebook runner (``run``).

May import: :mod:`floss.util`, :mod:`floss.core`, :mod:`floss.models` (official-weights facts), matplotlib. Not
part of the code identity (floss.util.provenance): a change here reruns only the report stage.
"""
