"""Incremental detokenization: split UTF-8 characters and stop strings."""

from edge_memdec.detok import TextStream


def test_multibyte_character_split_across_pieces_is_emitted_whole():
    stream = TextStream()
    data = "café ✓".encode()
    out = [stream.push(data[i : i + 1]) for i in range(len(data))]
    assert "".join(out) + stream.flush() == "café ✓"
    assert all("\ufffd" not in piece for piece in out)


def test_stop_string_ends_the_text_and_is_not_included():
    stream = TextStream(stop=["###"])
    shown = stream.push(b"hello #") + stream.push(b"#") + stream.push(b"# tail")
    assert shown == "hello "
    assert stream.stopped
    assert stream.text == "hello "
    assert stream.push(b"more") == ""


def test_partial_stop_string_is_released_when_it_turns_out_not_to_be_one():
    stream = TextStream(stop=["</end>"])
    assert stream.push(b"a </e") == "a "
    assert stream.push(b"x") == "</ex"
    assert stream.push(b" </en") == " "
    assert stream.flush() == "</en"
    assert stream.text == "a </ex </en"


def test_invalid_bytes_become_replacement_characters():
    stream = TextStream()
    assert stream.push(b"ok\xff") + stream.flush() == "ok\ufffd"
