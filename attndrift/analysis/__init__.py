"""Analysis: what an edit does inside a model, on any model, edited or not (an edit comes in
as hooks). ``cells`` is the cell engine of ``patching``, ``tracing`` and ``knockout``; ``drift``
measures attention drift. Nothing here imports :mod:`attndrift.editing`.
"""
