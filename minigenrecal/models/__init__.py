"""Models: how a model renders a sample (`render`), the `VLMView` a stage talks to (`vlm`: a renderer with its model),
the one registry of what differs between VLM families (`families`), the offline tiny pair (`tiny`) and tiny pairs of
any preset's classes (`tiny_pairs`), hub loading (`hub`), and the named presets over one set of knobs (`presets`).
Everything family-specific lives here."""
