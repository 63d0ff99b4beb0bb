"""From run folders to paper tables and plots: run selection, cells, formatting, figures."""
