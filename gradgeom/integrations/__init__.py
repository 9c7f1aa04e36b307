"""Training-loop integrations. Each submodule imports its framework lazily:
``gradgeom.integrations.hf`` needs ``transformers``, ``gradgeom.integrations.lightning`` needs
``lightning``; importing :mod:`gradgeom` needs neither."""
