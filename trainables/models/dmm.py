from .base import SequenceModel


class DeepMarkovModel(SequenceModel):  # placeholder, being written
    family = "dmm"
