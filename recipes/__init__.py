"""The recipes: thin ``TrlParser`` scripts, one per method and experiment, each runnable on the offline lab with no
arguments and with ``--config configs/<name>_lab.yaml``.

In a checkout they are the ``accelerate launch recipes/<name>.py`` entry points; an installed package holds them as
``hf_rlhf_ext.recipes`` (``accelerate launch -m hf_rlhf_ext.recipes.<name>``, or ``hf-rlhf-ext <name>``).
"""
