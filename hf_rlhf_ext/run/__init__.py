"""One recipe run, from the command line to the finished output directory.

``spec`` (what a run is: the script arguments and the built setup), ``parsing`` (YAML defaults, the parser, how the
run was launched), ``build`` (lab, policy, prompts, rewards, trainer), ``monitors`` (``--monitor``), ``finish``
(evaluation, metrics, card, push) and ``errors`` (one readable line per failure). Recipes and experiments import
from these modules directly; nothing is re-exported here.
"""
