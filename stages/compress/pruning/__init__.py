"""Structured channel pruning of any convolutional network, in Torch-Pruning's split:

- ``dependency``: trace a forward pass into a channel graph (which channels are tied, which
  must stay);
- ``importance``: rank tied groups by |gamma| and plan what to remove;
- ``surgery``: cut the planned channels for real, folding their constants into their consumers;
- ``replay``: the split sizes a pruned module replays (what pruned checkpoints carry);
- ``budget``: what a plan costs, counted without surgery, and the ratio that meets a target.

What is model-specific (which outputs are predictions) comes in as an argument of the trace.
"""
