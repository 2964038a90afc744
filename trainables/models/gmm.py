from .base import SequenceModel


class GaussianMixture(SequenceModel):  # placeholder, being written
    family = "gmm"
