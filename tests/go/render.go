// render executes a Go text/template (the engine Ollama runs a Modelfile's TEMPLATE with) on JSON values.
//
//	go build -o render render.go
//	echo '{"template": "{{ .System }}", "values": {"System": "hi"}}' | ./render
//
// Values decode into maps and slices, which text/template reads with the same field syntax
// (.Role, $.System) as Ollama's structs. Ollama's own template also defines the function "json"
// (marshal a value); it is added here so templates using it parse as they do there.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"text/template"
)

func main() {
	var in struct {
		Template string         `json:"template"`
		Values   map[string]any `json:"values"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fmt.Fprintln(os.Stderr, "bad input:", err)
		os.Exit(2)
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	t, err := template.New("modelfile").Option("missingkey=zero").Funcs(funcs).Parse(in.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, "parse:", err)
		os.Exit(3)
	}
	if err := t.Execute(os.Stdout, in.Values); err != nil {
		fmt.Fprintln(os.Stderr, "execute:", err)
		os.Exit(4)
	}
}
