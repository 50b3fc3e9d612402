"""Interactive, self-contained HTML reports of loram-bench results (plotly, works offline)."""
