"""A small built-in text for the example language model, so the demo needs no download.

The text is original prose written for ftd (about training runs, snapshots and machines that fail
and come back). VOCAB is its sorted set of characters; encode() maps text to their indices.
"""
from __future__ import annotations

TEXT = """\
The run began on a cold Tuesday, in a room full of humming machines. Eight nodes, each with its
own fans and its own small worries, agreed to learn the same thing together. Every step they
looked at a handful of sentences, guessed the next letter, measured how wrong they were, and
nudged a few million numbers in the direction of being less wrong. Nobody watched the numbers
move. People watched a single line on a screen, the loss, and hoped it would keep going down.

For the first hour it did. The line fell quickly, then slowly, the way a stone settles in a
pond. The optimizer kept two running averages for every weight, a memory of where the gradient
had been pointing and how loud it had been. The scheduler raised the learning rate gently at the
start, like a driver easing onto a cold road, and then let it drift down again as the model grew
more certain. All of this was state: not only the weights, but the averages, the step counter,
the position in the data, and the seeds that decided which sentences came next and which
neurons were dropped for a moment to keep the model honest.

At ten past three, node five lost its power supply. There was no warning and no error message,
only a silence where a process used to be. The other seven waited politely for a reply that
would never come, then gave up and stopped. In the old days this would have meant a long walk
back to the last checkpoint on disk, written an hour earlier because writing it took so long
that nobody wanted to do it more often. An hour of eight machines, thrown away, and then the
slow work of reading gigabytes back from a shared file system that everyone else was also using.

This time was different. After every step, each trainer had quietly copied its state into the
memory of a small daemon that lived beside it on the same machine. The copy happened while the
next step was already running, so the trainers barely noticed it. The daemons, in turn, had
shared a little parity with one another, enough to rebuild any one node that vanished. When node
five came back with a fresh power supply and an empty memory, its daemon asked the others for
the pieces it had lost, solved a small puzzle of exclusive ors, and stood there holding the same
bytes it had held a minute before the failure.

The trainers restarted. Each one asked its daemon a simple question: what is the newest step
that all of us can return to? The answer was the same everywhere, because it had to be. They
loaded their weights, their optimizer moments, their scheduler, their counters and even the
exact state of every random number generator, and carried on from the step after it. The loss
that came out of the next step matched, to the last bit, the loss the run would have printed if
the power supply had never failed. A careful engineer checked this by running the same job twice,
once with a failure and once without, and comparing every number in hexadecimal. They agreed.

There is a lesson here about machines, and perhaps about people. Things break at inconvenient
moments, and the question is never whether they will, but how much is lost when they do. A run
that remembers where it was, in a place that outlives the crash, loses almost nothing. It pauses,
it takes a breath, and it goes on learning the next letter of the next sentence, as if the cold
Tuesday had been an ordinary one. By the evening the line on the screen was lower than anyone
had expected, and the room was still humming.
"""

VOCAB: list[str] = sorted(set(TEXT))
_INDEX = {ch: i for i, ch in enumerate(VOCAB)}


def encode(text: str) -> list[int]:
    """Indices into VOCAB; raises KeyError for a character the corpus does not contain."""
    return [_INDEX[ch] for ch in text]


def decode(ids: list[int]) -> str:
    return "".join(VOCAB[i] for i in ids)
