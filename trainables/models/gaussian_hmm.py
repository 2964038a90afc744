from .base import SequenceModel


class GaussianHMM(SequenceModel):  # placeholder, being written
    family = "gaussian-hmm"
