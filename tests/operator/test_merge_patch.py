"""The merge patch between two objects turns the first into the second, and nothing else; applying
one does what the API server does."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from json_merge_patch import apply_merge_patch

from kvcache.operator.merge_patch import apply, diff

# JSON without nulls (a null in a merge patch means "remove"), with small keys so that the two
# sides share keys often.
scalars = st.one_of(st.booleans(), st.integers(), st.text(max_size=3))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.sampled_from("abcd"), inner, max_size=4)
    ),
    max_leaves=12,
)
objects = st.dictionaries(st.sampled_from("abcdef"), values, max_size=5)


@given(objects, objects)
def test_applying_the_diff_gives_the_desired_object(current, desired):
    assert apply_merge_patch(current, diff(current, desired)) == desired


@given(objects, objects)
def test_applying_a_patch_leaves_the_object_and_agrees_with_the_reference(current, desired):
    patch = diff(current, desired)
    before = repr(current)
    assert apply(current, patch) == apply_merge_patch(current, patch) == desired
    assert repr(current) == before


@given(objects)
def test_equal_objects_need_no_patch(current):
    assert diff(current, current) == {}


def test_the_patch_names_only_what_changed():
    current = {"metadata": {"labels": {"a": "1", "b": "2"}, "name": "x"}, "spec": {"replicas": 2}}
    desired = {"metadata": {"labels": {"a": "1", "c": "3"}, "name": "x"}, "spec": {"replicas": 2}}
    assert diff(current, desired) == {"metadata": {"labels": {"b": None, "c": "3"}}}
