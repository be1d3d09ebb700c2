"""Views of what a model records, for notebooks and files: :func:`show_attention`, the
attention explorer (one self-contained HTML page, no network; see
:mod:`interp.viz.attention`)."""

from interp.viz.attention import AttentionView, HeadInfo, show_attention

__all__ = ["AttentionView", "HeadInfo", "show_attention"]
