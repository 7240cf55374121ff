"""Extract structured fields into JSON: constant keys, typed generations for the values.

`gen_int` / `gen_string` / `regex=` constrain the values once the engine enforces grammars; the
stop strings keep them well-formed until then.
"""

import json

import radixlm as sgl


@sgl.function
def extract_person(s, text):
    s += "Extract the person described in the text as JSON.\n\n"
    s += "Text: " + text + "\n"
    with s.var_scope("json"):
        s += '{\n  "name": "' + sgl.gen("name", stop='"', max_tokens=16) + '",\n'
        s += '  "age": ' + sgl.gen_int("age", stop=[",", "}"], max_tokens=4) + ",\n"
        s += '  "city": "' + sgl.gen("city", stop='"', max_tokens=16) + '"\n}'


if __name__ == "__main__":
    sgl.set_default_backend(sgl.Engine())
    state = extract_person.run(
        text="Maria Lopez, 34, moved from Madrid to Lisbon last year to work as a nurse.",
        temperature=0,
    )
    print(state["json"])
    print(json.loads(state["json"]))
