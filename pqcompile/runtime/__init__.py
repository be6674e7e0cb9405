"""Running saved artifacts: ``runner.py`` is a standalone script that needs only numpy and TVM."""
