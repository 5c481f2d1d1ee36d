"""Regenerate imagenet_classes.txt from timm's ImageNet-1k info files (``pip install timm``).

timm ships the 1000 ImageNet-1k synsets in class-index order (``imagenet_synsets.txt``) and each synset's
WordNet lemmas (``imagenet_synset_to_lemma.txt``); the class name is the first lemma.
"""

from pathlib import Path

from timm.data import ImageNetInfo


def main() -> None:
    info = ImageNetInfo("imagenet-1k")
    names = [info.index_to_description(i).split(",")[0].strip() for i in range(info.num_classes())]
    assert len(names) == 1000 and all(names)
    Path(__file__).with_name("imagenet_classes.txt").write_text("\n".join(names) + "\n")


if __name__ == "__main__":
    main()
