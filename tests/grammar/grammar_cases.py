"""Schemas and regexes the structured-output tests generate for, with prompts that fit them."""

from __future__ import annotations

from typing import Any

_NAME = {"type": "string", "maxLength": 16}

SCHEMAS: dict[str, tuple[str, dict[str, Any]]] = {
    "person": (
        "Extract the person as JSON: Alice Martin is 31 years old and lives in Paris.",
        {
            "type": "object",
            "properties": {"name": _NAME, "age": {"type": "integer"}, "city": _NAME},
            "required": ["name", "age", "city"],
            "additionalProperties": False,
        },
    ),
    "nested": (
        "Describe the order as JSON: Bob ordered from 12 Baker Street, London.",
        {
            "type": "object",
            "properties": {
                "customer": {
                    "type": "object",
                    "properties": {
                        "name": _NAME,
                        "address": {
                            "type": "object",
                            "properties": {"street": _NAME, "city": _NAME},
                            "required": ["street", "city"],
                            "additionalProperties": False,
                        },
                    },
                    "required": ["name", "address"],
                    "additionalProperties": False,
                }
            },
            "required": ["customer"],
            "additionalProperties": False,
        },
    ),
    "array": (
        "List up to three tags for a blog post about baking bread, as JSON.",
        {
            "type": "object",
            "properties": {
                "title": _NAME,
                "tags": {"type": "array", "items": _NAME, "minItems": 1, "maxItems": 3},
            },
            "required": ["title", "tags"],
            "additionalProperties": False,
        },
    ),
    "enum": (
        "Classify the sentiment of 'I love this phone' as JSON.",
        {
            "type": "object",
            "properties": {
                "sentiment": {"enum": ["positive", "negative", "neutral"]},
                "confidence": {"type": "string", "enum": ["low", "medium", "high"]},
            },
            "required": ["sentiment", "confidence"],
            "additionalProperties": False,
        },
    ),
    "numbers": (
        "A laptop costs 999.99 dollars and 3 are in stock. Give the product as JSON.",
        {
            "type": "object",
            "properties": {
                "price": {"type": "number", "minimum": 0, "maximum": 100000},
                "stock": {"type": "integer", "minimum": 0, "maximum": 1000},
                "available": {"type": "boolean"},
            },
            "required": ["price", "stock", "available"],
            "additionalProperties": False,
        },
    ),
    "optional": (
        "Give a book as JSON: 'Dune' by Frank Herbert.",
        {
            "type": "object",
            "properties": {"title": _NAME, "author": _NAME, "year": {"type": "integer"}},
            "required": ["title"],
            "additionalProperties": False,
        },
    ),
}

REGEXES: dict[str, tuple[str, str]] = {
    "date": (
        "What is the date of the first moon landing? Answer as YYYY-MM-DD.",
        r"\d{4}-\d{2}-\d{2}",
    ),
    "email": (
        "Write an e-mail address for John Smith at example.com.",
        r"[a-z]{1,12}(\.[a-z]{1,12})?@[a-z]{1,12}\.(com|org|net)",
    ),
    "integer": (
        "How many legs does a spider have? Answer with a number.",
        r"-?(0|[1-9][0-9]{0,5})",
    ),
}


# The extraction workload of `benchmarks/bench_grammar.py`: a person's name, age and city.
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "city": {"type": "string"},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
