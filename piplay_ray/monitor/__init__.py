"""What a person watching a run sees: the console (`console.py`), metrics and samples on disk, TensorBoard
and W&B (`metrics.py`), the run summary (`summary.py`), experiment tables and plots (`report.py`), and the
web dashboard (`dashboard/`)."""
