from .base import SequenceModel

# placeholders, being written
class BernoulliHMM(SequenceModel): family = "hmm"
class AutoregressiveHMM(SequenceModel): family = "arhmm"
class FactorialHMM(SequenceModel): family = "fhmm"
class PartiallyFactorialHMM(SequenceModel): family = "pfhmm"
class SecondOrderHMM(SequenceModel): family = "hmm2"
class NeuralHMM(SequenceModel): family = "nnhmm"
