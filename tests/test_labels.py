"""Labels for training images: the schema and --label text, Fashion-MNIST, class folders, CSV files."""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import _shared  # the shared-data rule (skip here, fail under CI), not a copy of it
from difflab.data.fashion_mnist import load_fashion_mnist
from difflab.data.images import load_folder
from difflab.data.labels import (
    FASHION_MNIST_CLASSES,
    Labels,
    LabelSchema,
    fashion_mnist_labels,
    folder_labels,
)
from difflab.data.labels_csv import csv_labels
from difflab.errors import ConfigError, DataError, DifflabWarning

HAIR_EYES = LabelSchema(attributes=("hair", "eyes"), classes=(("black", "blue", "red"), ("blue", "green", "red", "yellow")))
FASHION = LabelSchema(attributes=("class",), classes=(FASHION_MNIST_CLASSES,))


def one_line(info: pytest.ExceptionInfo) -> None:
    """The error must be a single line (the CLI prints it as one)."""
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message


@pytest.fixture(scope="module")
def anime_tagged_dir() -> Path:
    return _shared("anime-tagged")


def write(tmp_path: Path, text: str | bytes, name: str = "tags.csv") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def no_warnings(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args)


def labelled_warnings(fn, *args) -> tuple[Labels, list[str]]:
    """Call fn, returning its Labels and the messages of the DifflabWarnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        labels = fn(*args)
    assert all(issubclass(w.category, DifflabWarning) for w in caught), [str(w.message) for w in caught]
    assert all(w.filename == __file__ for w in caught), "warnings must point at the caller (stacklevel)"
    return labels, [str(w.message) for w in caught]


# --------------------------------------------------------------------------------------------
# LabelSchema


def test_schema_normalises_lists_and_round_trips_through_json():
    schema = LabelSchema(attributes=["hair", "eyes"], classes=[["black", "blue", "red"], ["blue", "green", "red", "yellow"]])
    assert schema == HAIR_EYES
    assert isinstance(schema.attributes, tuple) and all(isinstance(c, tuple) for c in schema.classes)
    assert LabelSchema(**json.loads(json.dumps(dataclasses.asdict(HAIR_EYES)))) == HAIR_EYES
    assert HAIR_EYES.sizes == (3, 4)
    assert FASHION.sizes == (10,)
    assert hash(schema) == hash(HAIR_EYES)


@pytest.mark.parametrize(
    ("attributes", "classes", "match"),
    [
        ("class", (("a", "b"),), "attributes must be a list"),
        (("class",), ("ab",), "classes of attribute 1 must be a list"),
        ((), (), "no attributes"),
        (("hair", "eyes"), (("a", "b"),), "2 attributes but 1 class lists"),
        (("hair",), (("blue",),), "attribute 'hair' needs at least 2 classes, has 1"),
        (("hair",), (("blue", "blue", "red"),), "attribute 'hair' lists class 'blue' more than once"),
        (("hair",), (("blue", ""),), "class name '' of attribute 'hair' is empty"),
        (("hair",), (("blue", " red"),), "class name ' red' of attribute 'hair' has surrounding spaces"),
        (("hair",), (("blue", "red,green"),), "class name 'red,green' of attribute 'hair' contains ','"),
        (("hair",), (("blue", "re\nd"),), "control character"),
        (("hair",), (("blue", 3),), "class name 3 of attribute 'hair' is not a string"),
        (("",), (("a", "b"),), "attribute name '' is empty"),
        (("hair", "Hair"), (("a", "b"), ("a", "b")), "attribute 'hair' appears more than once"),
        (("ha=ir",), (("a", "b"),), "attribute name 'ha=ir' contains '='"),
    ],
)
def test_schema_rejects_bad_names(attributes, classes, match):
    with pytest.raises(ConfigError, match=match) as info:
        LabelSchema(attributes=attributes, classes=classes)
    one_line(info)


def test_index_of_exact_then_case_insensitive_then_index():
    schema = LabelSchema(attributes=("colour",), classes=(("red", "Red", "blue", "7"),))
    assert schema.index_of("colour", "red") == 0
    assert schema.index_of("colour", "Red") == 1
    assert schema.index_of("colour", "BLUE") == 2  # the only case-insensitive match
    assert schema.index_of("COLOUR", " blue ") == 2
    assert schema.index_of("colour", "7") == 3  # a class name wins over the index 7 (which is out of range anyway)
    assert schema.index_of("colour", "2") == 2  # a decimal index
    message = r"unknown colour 'RED'; choose one of red, Red, blue, 7 \(or an index 0\.\.3\)"
    with pytest.raises(ConfigError, match=message) as info:
        schema.index_of("colour", "RED")  # two case-insensitive matches: neither is taken
    one_line(info)
    with pytest.raises(ConfigError, match=r"unknown colour '4'"):
        schema.index_of("colour", "4")
    with pytest.raises(ConfigError, match=r"unknown colour '-1'"):
        schema.index_of("colour", "-1")
    with pytest.raises(ConfigError, match=r"unknown label attribute 'hair'; the attributes are colour"):
        schema.index_of("hair", "red")


def test_index_of_lists_at_most_30_names():
    schema = LabelSchema(attributes=("id",), classes=(tuple(f"c{i}" for i in range(100)),))
    with pytest.raises(ConfigError, match=r"choose one of c0, c1, .*, c29; and 70 more \(or an index 0\.\.99\)"):
        schema.index_of("id", "x")


def test_parse_named_partial_bare_and_indices():
    assert HAIR_EYES.parse("hair=blue,eyes=red") == [1, 2]
    assert HAIR_EYES.parse(" eyes = Yellow , HAIR=black ") == [0, 3]
    assert HAIR_EYES.parse("hair=blue") == [1, -1]
    assert HAIR_EYES.parse("eyes=0") == [-1, 0]
    assert FASHION.parse("Trouser") == [1]
    assert FASHION.parse("1") == [1]
    assert FASHION.parse("class=Trouser") == [1]
    assert FASHION.parse("T-shirt/top") == [0]
    assert FASHION.parse("ankle BOOT") == [9]
    assert FASHION.parse("class = ankle boot") == [9]
    odd = LabelSchema(attributes=("kind",), classes=(("a=b", "c"),))
    assert odd.parse("a=b") == [0]  # a bare name holding '=' is read whole
    assert odd.parse("kind=a=b") == [0]  # split on the first '='


@pytest.mark.parametrize(
    ("schema", "text", "match"),
    [
        (HAIR_EYES, "hair=bleu", r"--label 'hair=bleu': unknown hair 'bleu'; choose one of black, blue, red"),
        (HAIR_EYES, "hair=7", r"--label 'hair=7': unknown hair '7'"),
        (HAIR_EYES, "colour=blue", r"--label 'colour=blue': unknown label attribute 'colour'; the attributes are hair, eyes"),
        (HAIR_EYES, "hair=blue,hair=red", r"--label 'hair=blue,hair=red': gives hair more than once"),
        (HAIR_EYES, "hair=blue,Hair=blue", r"gives hair more than once"),
        (HAIR_EYES, "hair=blue,", r"--label 'hair=blue,': has an empty part"),
        (HAIR_EYES, ",hair=blue", r"has an empty part"),
        (HAIR_EYES, "", r"--label '': is empty; give 'hair=black,eyes=blue'"),
        (HAIR_EYES, "   ", r"is empty"),
        (HAIR_EYES, "blue", r"--label 'blue': say which attribute 'blue' is for, as hair=blue or eyes=blue"),
        (HAIR_EYES, "hair=", r"part 'hair=' needs both an attribute and a value"),
        (HAIR_EYES, "=blue", r"part '=blue' needs both an attribute and a value"),
        (FASHION, "Trousers", r"--label 'Trousers': unknown class 'Trousers'; choose one of T-shirt/top, Trouser"),
        (FASHION, "10", r"unknown class '10'.*\(or an index 0\.\.9\)"),
        (FASHION, "Trouser,Coat", r"gives class more than once"),
        (FASHION, "", r"is empty; give a class such as 'T-shirt/top'"),
    ],
)
def test_parse_errors_name_the_flag(schema, text, match):
    with pytest.raises(ConfigError, match=match) as info:
        schema.parse(text)
    one_line(info)


def test_describe_parse_names_round_trip_every_row():
    for row in itertools.product(*(range(-1, n) for n in HAIR_EYES.sizes)):
        row = list(row)
        names = HAIR_EYES.names(row)
        assert list(names) == ["hair", "eyes"]
        assert [None if v < 0 else HAIR_EYES.classes[a][v] for a, v in enumerate(row)] == list(names.values())
        text = HAIR_EYES.describe(row)
        if row == [-1, -1]:
            assert text == "unconditional"
        else:
            assert HAIR_EYES.parse(text) == row
    assert HAIR_EYES.describe([1, 2]) == "hair=blue, eyes=red"
    assert HAIR_EYES.describe([-1, 3]) == "eyes=yellow"
    assert HAIR_EYES.describe(torch.tensor([2, 0])) == "hair=red, eyes=blue"  # a tensor row works too
    for i, name in enumerate(FASHION_MNIST_CLASSES):
        assert FASHION.describe([i]) == name
        assert FASHION.parse(FASHION.describe([i])) == [i]
        assert FASHION.names([i]) == {"class": name}
    assert FASHION.describe([-1]) == "unconditional"
    assert FASHION.names([-1]) == {"class": None}


@pytest.mark.parametrize(
    ("row", "match"),
    [([0], r"label row \[0\] has 1 entries; the schema has 2 attributes"),
     ([3, 0], r"hair index 3 is outside -1\.\.2"),
     ([0, -2], r"eyes index -2 is outside -1\.\.3")],
)
def test_names_rejects_bad_rows(row, match):
    with pytest.raises(ConfigError, match=match):
        HAIR_EYES.names(row)
    with pytest.raises(ConfigError, match=match):
        HAIR_EYES.describe(row)


def test_labels_checks_its_shapes():
    keep = torch.tensor([True, False, True])
    Labels(HAIR_EYES, torch.tensor([[0, 1], [2, -1]]), keep)
    with pytest.raises(ValueError, match="int64 of shape"):
        Labels(HAIR_EYES, torch.tensor([[0], [2]]), keep)
    with pytest.raises(ValueError, match="keep marks 2 images but index has 1 rows"):
        Labels(HAIR_EYES, torch.tensor([[0, 1]]), keep)
    with pytest.raises(ValueError, match="outside -1..size-1"):
        Labels(HAIR_EYES, torch.tensor([[3, 1], [0, 0]]), keep)


# --------------------------------------------------------------------------------------------
# Fashion-MNIST


def test_fashion_mnist_labels():
    targets = torch.tensor([9, 0, 3, 3], dtype=torch.int64)
    labels = fashion_mnist_labels(targets)
    assert labels.schema == FASHION
    assert labels.index.dtype == torch.int64 and labels.index.shape == (4, 1)
    assert labels.index[:, 0].tolist() == [9, 0, 3, 3]
    assert labels.keep.tolist() == [True] * 4
    assert labels.schema.describe(labels.index[0].tolist()) == "Ankle boot"
    targets[0] = 1
    assert labels.index[0, 0] == 9  # a copy, not a view of the caller's tensor
    assert fashion_mnist_labels(torch.tensor([1, 2], dtype=torch.uint8)).index[:, 0].tolist() == [1, 2]


@pytest.mark.parametrize(
    ("targets", "match"),
    [(torch.tensor([0, 10, 11]), r"fashion-mnist label 10 \(image 1, 2 such\) is outside 0\.\.9"),
     (torch.tensor([-1, 0]), r"fashion-mnist label -1 \(image 0, 1 such\)"),
     (torch.tensor([0.0, 1.0]), r"must be a 1-d integer tensor"),
     (torch.zeros(2, 1, dtype=torch.int64), r"must be a 1-d integer tensor")],
)
def test_fashion_mnist_labels_rejects(targets, match):
    with pytest.raises(DataError, match=match):
        fashion_mnist_labels(targets)


def test_fashion_mnist_labels_on_the_real_test_split(fashion_mnist_dir):
    _, targets = load_fashion_mnist(fashion_mnist_dir, "test", progress=False)
    labels = fashion_mnist_labels(targets)
    # the published test split has 1000 images of each class
    assert torch.bincount(labels.index[:, 0], minlength=10).tolist() == [1000] * 10
    assert labels.keep.all() and len(labels.keep) == 10_000


# --------------------------------------------------------------------------------------------
# class folders


def test_folder_labels_sorted_classes_nested_paths_and_keep():
    paths = ["zebra/1.jpg", "ant/a/2.png", "ant/3.jpg", "zebra/4.jpg", "moth/5.jpg", "moth/6.jpg"]
    labels = no_warnings(folder_labels, paths, "/data/animals")
    assert labels.schema == LabelSchema(attributes=("class",), classes=(("ant", "moth", "zebra"),))
    assert labels.index[:, 0].tolist() == [2, 0, 0, 2, 1, 1]
    assert labels.keep.all()


def test_folder_labels_numeric_class_names_sort_by_value():
    paths = [f"{c}/{i}.png" for c in ("10", "2", "1", "0") for i in range(2)]
    labels = no_warnings(folder_labels, paths, "digits")
    assert labels.schema.classes == (("0", "1", "2", "10"),)
    assert labels.schema.parse("2") == [2]  # the name "2" is also index 2
    assert labels.index[:, 0].tolist() == [3, 3, 2, 2, 1, 1, 0, 0]


def test_folder_labels_drop_root_images_with_one_warning():
    paths = ["a.jpg", "cats/1.jpg", "cats/2.jpg", "dogs/1.jpg", "dogs/2.jpg"] + [f"loose{i}.jpg" for i in range(6)]
    with pytest.warns(DifflabWarning, match=r"^pets: 7 of 11 images lie directly in the folder, not in a class sub-folder, "
                                            r"and are left out: a\.jpg, loose0\.jpg, loose1\.jpg, loose2\.jpg, loose3\.jpg; "
                                            r"and 2 more$") as record:
        labels = folder_labels(paths, "pets")
    assert len(record) == 1
    assert labels.keep.tolist() == [False, True, True, True, True] + [False] * 6
    assert labels.index[:, 0].tolist() == [0, 0, 1, 1]


def test_folder_labels_warn_about_single_image_classes():
    labels, messages = labelled_warnings(folder_labels, ["a/1.jpg", "a/2.jpg", "b/3.jpg", "c/4.jpg"], "root")
    assert messages == ["root: 2 classes have a single image (a class cannot be learned from one image): "
                        "'b' (b/3.jpg), 'c' (c/4.jpg)"]
    assert labels.schema.sizes == (3,)


@pytest.mark.parametrize(
    ("paths", "match"),
    [(["cats/1.jpg", "cats/2.jpg", "x.jpg"], r"^/data/pets: class labels need images in at least 2 class sub-folders, "
                                             r"found only 'cats'$"),
     (["x.jpg", "y.jpg"], r"^/data/pets: class labels need .* found none$"),
     ([], r"^/data/pets: no images to label$"),
     (["a,b/1.jpg", "c/2.jpg"], r"class folder 'a,b' contains ','")],
)
def test_folder_labels_errors_name_the_root(paths, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DifflabWarning)
        with pytest.raises(DataError, match=match):
            folder_labels(paths, Path("/data/pets"))


def test_folder_labels_on_paths_from_the_folder_loader(tmp_path):
    for rel in ["b/x1.png", "b/deep/x2.png", "a/x3.png", "a/x4.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(tmp_path / rel)
    folder = load_folder(tmp_path, 8, progress=False, workers=1)
    labels = no_warnings(folder_labels, folder.paths, tmp_path)
    assert labels.schema.classes == (("a", "b"),)
    assert [labels.schema.describe([i]) for i in labels.index[:, 0].tolist()] == [p.split("/")[0] for p in folder.paths]


# --------------------------------------------------------------------------------------------
# CSV files: matching


def test_csv_ids_match_stems_in_path_order(tmp_path):
    csv = write(tmp_path, "id,hair,eyes\n3,red,green\n1,black,blue\n2,red,green\n10,black,blue\n")
    paths = ["1.jpg", "10.jpg", "2.jpg", "3.jpg"]
    labels = no_warnings(csv_labels, csv, paths)
    assert labels.schema == LabelSchema(attributes=("hair", "eyes"), classes=(("black", "red"), ("blue", "green")))
    assert labels.keep.tolist() == [True] * 4
    # rows follow `paths`, not the file
    assert [labels.schema.describe(r) for r in labels.index.tolist()] == [
        "hair=black, eyes=blue", "hair=black, eyes=blue", "hair=red, eyes=green", "hair=red, eyes=green"]


def test_csv_relative_paths_paths_without_extension_and_stems(tmp_path):
    paths = ["images/a.jpg", "images/b.png", "other/c.jpg", "other/d.jpeg", "e.jpg"]
    csv = write(tmp_path, "file,kind\nimages/a.jpg,x\nimages/b,y\nc,x\n./other/d.jpeg,y\ne.jpg,x\n")
    labels = no_warnings(csv_labels, csv, paths)
    assert labels.schema.classes == (("x", "y"),)
    assert labels.index[:, 0].tolist() == [0, 1, 0, 1, 0]
    # a cell naming the file with another folder still matches its (unique) file name
    csv2 = write(tmp_path, "file,kind\nimgs/a.jpg,x\nb,y\nc,x\nd,y\n", "other.csv")
    labels, messages = labelled_warnings(csv_labels, csv2, paths)
    assert messages == [f"{csv2}: 1 of 5 images have no row and are left out: e.jpg"]
    assert labels.keep.tolist() == [True, True, True, True, False]


def test_csv_extension_in_a_cell_is_not_ignored(tmp_path):
    csv = write(tmp_path, "id,kind\n1.png,x\n2.jpg,y\n3,x\n4,y\n5,x\n")
    labels, messages = labelled_warnings(csv_labels, csv, ["1.jpg", "2.jpg", "3.jpg", "4.jpg", "5.jpg"])
    assert messages == [f"{csv}: 1 of 5 rows name images that are not among the 5 images and are ignored: {csv}:2 (1.png)",
                        f"{csv}: 1 of 5 images have no row and are left out: 1.jpg"]
    assert labels.keep.tolist() == [False, True, True, True, True]


def test_csv_bom_whitespace_quotes_and_blank_lines(tmp_path):
    text = '\ufeff id , hair \r\n\r\n "1" ,  red \r\n2,"blue"\r\n\r\n3,  "red" \n 4 , " blue"\n\n'
    labels = no_warnings(csv_labels, write(tmp_path, text), ["1.jpg", "2.jpg", "3.jpg", "4.jpg"])
    assert labels.schema == LabelSchema(attributes=("hair",), classes=(("blue", "red"),))
    assert labels.index[:, 0].tolist() == [1, 0, 1, 0]


def test_csv_class_order_is_sorted_and_numeric_columns_by_value(tmp_path):
    rows = "".join(f"{i},{c},{n}\n" for i, (c, n) in enumerate(zip("zyxzyx", ["10", "9", "10", "1", "9", "1"])))
    labels = no_warnings(csv_labels, write(tmp_path, "id,letter,number\n" + rows), [f"{i}.png" for i in range(6)])
    assert labels.schema.classes == (("x", "y", "z"), ("1", "9", "10"))
    assert labels.index.tolist() == [[2, 2], [1, 1], [0, 2], [2, 0], [1, 1], [0, 0]]


def test_csv_classes_come_from_matched_rows_only(tmp_path):
    csv = write(tmp_path, "id,kind\n1,a\n2,b\n3,b\n4,a\n9,never\n")
    with pytest.warns(DifflabWarning, match=r"1 of 5 rows name images"):
        labels = csv_labels(csv, ["1.jpg", "2.jpg", "3.jpg", "4.jpg"])
    assert labels.schema.classes == (("a", "b"),)


def test_csv_ambiguous_stem(tmp_path):
    csv = write(tmp_path, "id,kind\na/1,x\n1,y\n")
    message = f"{csv}:3: image '1' is ambiguous, it could be any of a/1.jpg, b/1.jpg"
    with pytest.raises(DataError, match=re.escape(message)) as info:
        csv_labels(csv, ["a/1.jpg", "b/1.jpg"])
    one_line(info)
    csv = write(tmp_path, "id,kind\na/1,x\n", "noext.csv")
    with pytest.raises(DataError, match=re.escape(f"{csv}:2: image 'a/1' is ambiguous, it could be any of a/1.jpg, a/1.png")):
        csv_labels(csv, ["a/1.jpg", "a/1.png"])
    csv = write(tmp_path, "id,kind\nx/1.jpg,x\n", "base.csv")
    with pytest.raises(DataError, match=re.escape(f"{csv}:2: image 'x/1.jpg' is ambiguous, it could be any of a/1.jpg, b/1.jpg")):
        csv_labels(csv, ["a/1.jpg", "b/1.jpg"])


# --------------------------------------------------------------------------------------------
# CSV files: bad files, each named with its line

PATHS = ["1.jpg", "2.jpg", "3.jpg", "4.jpg"]
GOOD_ROWS = "1,red,blue\n2,red,green\n3,black,blue\n4,black,green\n"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", r"label file {f} is empty: it needs a header row"),
        ("\n\n", r"label file {f} is empty"),
        ("id,hair,eyes\n", r"label file {f} has a header but no rows"),
        ("id\n1\n2\n", r"{f}:1: the header names 1 column, needs at least 2"),
        ("id;hair;eyes\n1;red;blue\n", r"{f}:1: the header names 1 column, .*; separate columns with ','"),
        ("id,hair,Hair\n" + GOOD_ROWS, r"{f}:1: column name 'Hair' appears twice \(columns 2 and 3\)"),
        ("id,,eyes\n" + GOOD_ROWS, r"{f}:1: column 2 of the header has no name"),
        ("id,ha=ir,eyes\n" + GOOD_ROWS, r"{f}:1: column name 'ha=ir' contains '='"),
        ("\nid,hair,eyes\n1,red,blue\n2,red\n", r"{f}:4: expected 3 fields \(id,hair,eyes\), found 2"),
        ("id,hair,eyes\n1,red,blue,\n", r"{f}:2: expected 3 fields \(id,hair,eyes\), found 4"),
        ("id,hair,eyes\n1,red,blue\n\n ,red,green\n", r"{f}:4: empty image name in column 'id'"),
        ("id,hair,eyes\n1,red,blue\n2,red, \n", r"{f}:3: empty value in column 'eyes'"),
        ("id,hair,eyes\n1,red,\n2,blue,\n", r"{f}: column 'eyes' is empty on every row"),
        ('id,hair,eyes\n1,"red,blue",blue\n', r"{f}:2: value 'red,blue' in column 'hair' contains ','"),
        ('id,hair,eyes\n1,"red\nx",blue\n', r"{f}:2: value 'red\\nx' in column 'hair' contains a control character"),
        ("id,hair,eyes\n1,red,blue\n2,red,green\n1.jpg,red,blue\n", r"{f}:4: image '1.jpg' is listed twice, on lines 2 and 4"),
        ("id,hair,eyes\n9,red,blue\n8,red,green\n9,red,blue\n", r"{f}:4: image '9' is listed twice, on lines 2 and 4"),
        ("1,red,blue\n2,red,green\n3,black,blue\n", r"{f}:1: the first row names the image '1'; the file needs a header row"),
        ("id,hair,eyes\n7,red,blue\n8,red,green\n",
         r"{f}: none of its 2 rows names one of the 4 images \(line 2 names '7'; the images are named like '1.jpg'\)"),
        ("id,hair,eyes\n1,red,blue\n2,red,green\n", r"{f}: column 'hair' has the single value 'red' for all 2 labelled images"),
    ],
)
def test_csv_bad_files(tmp_path, text, match):
    csv = write(tmp_path, text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DifflabWarning)
        with pytest.raises(DataError, match="^" + match.replace("{f}", re.escape(str(csv)))) as info:
            csv_labels(csv, PATHS)
    one_line(info)


def test_csv_not_utf8_names_file_and_line(tmp_path):
    csv = write(tmp_path, "id,hair,eyes\n1,red,blue\n2,r\xe9d,blue\n".encode("latin-1"))
    with pytest.raises(DataError, match=re.escape(f"{csv}:3: not UTF-8 text (byte 0xe9); save the file as UTF-8")) as info:
        csv_labels(csv, PATHS)
    one_line(info)
    csv = write(tmp_path, "id,hair\n1,red\n".encode("utf-16"), "utf16.csv")
    with pytest.raises(DataError, match=re.escape(f"{csv}:1: not UTF-8 text")):
        csv_labels(csv, PATHS)


def test_csv_missing_file_and_folder(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"label file {tmp_path / 'nope.csv'} does not exist")):
        csv_labels(tmp_path / "nope.csv", PATHS)
    with pytest.raises(DataError, match=re.escape(f"label file {tmp_path} is not a file")):
        csv_labels(str(tmp_path), PATHS)


def test_csv_unreadable_lines_are_one_line_errors(tmp_path):
    csv = write(tmp_path, "id,hair\n1,red\n2,bl\x00ue\n")
    with pytest.raises(DataError, match=re.escape(f"{csv}:3: value 'bl\\x00ue' in column 'hair' contains a control character")):
        csv_labels(csv, PATHS)
    csv = write(tmp_path, "id,hair\n1,red\n2," + "x" * 200_000 + "\n")  # over the csv module's field size limit
    with pytest.raises(DataError, match=re.escape(f"{csv}:3: not a readable CSV line (field larger than field limit")) as info:
        csv_labels(csv, PATHS)
    one_line(info)


def test_csv_no_images(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'tags.csv'}: no images to label")):
        csv_labels(write(tmp_path, "id,hair\n1,red\n2,blue\n"), [])


# --------------------------------------------------------------------------------------------
# CSV files: warnings (one each, with counts)


def test_csv_rows_for_absent_images_warn_once_with_count_and_lines(tmp_path):
    rows = "".join(f"{i},{'ab'[i % 2]}\n" for i in range(1, 11))  # lines 2..11 for ids 1..10
    csv = write(tmp_path, "id,kind\n" + rows)
    f = re.escape(str(csv))
    labels, messages = labelled_warnings(csv_labels, csv, ["1.jpg", "2.jpg", "3.jpg", "4.jpg"])
    assert len(messages) == 1
    assert re.fullmatch(f"{f}: 6 of 10 rows name images that are not among the 4 images and are ignored: "
                        f"{f}:6 \\(5\\), {f}:7 \\(6\\), {f}:8 \\(7\\), {f}:9 \\(8\\), {f}:10 \\(9\\); and 1 more", messages[0])
    assert labels.keep.all() and labels.index[:, 0].tolist() == [1, 0, 1, 0]


def test_csv_images_without_rows_warn_once_and_are_not_kept(tmp_path):
    csv = write(tmp_path, "id,kind\n2,a\n4,b\n6,a\n8,b\n")
    paths = [f"{i}.jpg" for i in range(1, 10)]
    with pytest.warns(DifflabWarning, match=f"^{re.escape(str(csv))}: 5 of 9 images have no row and are left out: "
                                            r"1\.jpg, 3\.jpg, 5\.jpg, 7\.jpg, 9\.jpg$") as record:
        labels = csv_labels(csv, paths)
    assert len(record) == 1
    assert labels.keep.tolist() == [i % 2 == 0 for i in range(1, 10)]
    assert labels.index.shape == (4, 1)
    assert labels.index[:, 0].tolist() == [0, 1, 0, 1]


def test_csv_values_with_a_single_image_warn_once_with_their_lines(tmp_path):
    csv = write(tmp_path, "id,hair,eyes\n1,red,blue\n2,red,blue\n3,black,blue\n4,black,green\n5,white,blue\n")
    labels, messages = labelled_warnings(csv_labels, csv, [f"{i}.jpg" for i in range(1, 6)])
    assert messages == [f"{csv}: 2 values label a single image (a class cannot be learned from one image): "
                        f"eyes=green (line 5), hair=white (line 6)"]
    assert labels.schema.classes == (("black", "red", "white"), ("blue", "green"))  # still kept


def test_csv_all_three_warnings_together(tmp_path):
    csv = write(tmp_path, "id,kind\n1,a\n2,a\n3,b\n4,c\n99,a\n")
    labels, messages = labelled_warnings(csv_labels, csv, ["1.jpg", "2.jpg", "3.jpg", "5.jpg"])
    assert len(messages) == 3
    assert "2 of 5 rows name images" in messages[0] and messages[0].endswith(f"ignored: {csv}:5 (4), {csv}:6 (99)")
    assert "1 of 4 images have no row and are left out: 5.jpg" in messages[1]
    assert messages[2].endswith("1 values label a single image (a class cannot be learned from one image): kind=b (line 4)")
    assert labels.schema.classes == (("a", "b"),)  # 'c' labels no image that is there
    assert labels.keep.tolist() == [True, True, True, False]


# --------------------------------------------------------------------------------------------
# the real tagged anime faces


def test_csv_labels_on_anime_tagged(anime_tagged_dir):
    tags = anime_tagged_dir / "tags.csv"
    paths = sorted(os.listdir(anime_tagged_dir / "images"))
    labels = no_warnings(csv_labels, tags, paths)
    assert labels.schema.attributes == ("hair", "eyes")
    # the README: hair (12) and eyes (10), each one value per image
    assert labels.schema.classes == (
        ("aqua", "black", "blonde", "blue", "brown", "gray", "green", "orange", "pink", "purple", "red", "white"),
        ("aqua", "black", "blue", "brown", "green", "orange", "pink", "purple", "red", "yellow"),
    )
    assert labels.index.shape == (20_732, 2) and bool(labels.keep.all())
    lines = tags.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "id,hair,eyes"
    row_of = {p: i for i, p in enumerate(paths)}
    for line in lines[1:51]:
        image, hair, eyes = line.split(",")
        assert labels.schema.names(labels.index[row_of[f"{image}.jpg"]].tolist()) == {"hair": hair, "eyes": eyes}
    # the README: 119 (hair, eyes) pairs, 88-236 images each; purple hair with black eyes never occurs
    pairs = torch.unique(labels.index, dim=0, return_counts=True)
    assert len(pairs[0]) == 119 and int(pairs[1].min()) == 88 and int(pairs[1].max()) == 236
    assert labels.schema.parse("hair=purple,eyes=black") not in labels.index.tolist()
