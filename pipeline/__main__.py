from pipeline.runtime.signals import install_early_handlers

install_early_handlers()  # before the heavier imports: a SIGTERM during start-up is a clean stop

from pipeline.cli import app  # noqa: E402

app()
