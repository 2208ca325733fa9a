"""Editing: the knowledge editors and what they share.

``kit`` (templates, keys, the batch editors' sequence), ``covariance`` (C), ``value`` (the v*/z
optimisation) with ``sadr``, ``layer_loop`` (the batch editors' layer loop), one module per
editor (``rome``, ``memit``, ``pmet``, ``alphaedit``), each ending with its line in
``registry``; ``edits`` (an edit as weights or hooks, saved and loaded) and ``setting`` (one
editing setting, the source of every command-line editing flag). Nothing here imports
:mod:`attndrift.analysis`.
"""
