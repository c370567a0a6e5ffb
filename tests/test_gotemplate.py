"""Go's text/template as lamina runs it (lamina.gotemplate), against Go's own answers.

The expected outputs and errors below were produced by Go's text/template (go1.19.8, Debian's
golang-go) with docker/cli's template functions, by the oracle program described in
test_gotemplate_oracle_matches: a Go program that runs each case and prints what Go printed or
the error it returned. Set LAMINA_GOTEMPLATE_ORACLE to the path of that program to run every case
through Go again and compare.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from lamina.gotemplate import Template, TemplateError
from lamina.gotemplate.tabwriter import tabwrite

# The data every case runs on: what Go decodes from this JSON (integers as int64).
DATA = {'Name': 'web',
        'Size': 1234567,
        'Ratio': 0.25,
        'Big': 1e+21,
        'On': True,
        'Off': False,
        'Nil': None,
        'Empty': '',
        'Tags': ['v1', 'latest'],
        'Nums': [3, 1, 2],
        'NoTags': [],
        'Labels': {'b': '2', 'a': '1', 'com.example.x': 'y'},
        'NoLabels': {},
        'Config': {'Cmd': ['sh', '-c', 'echo hi'], 'Env': None, 'User': '', 'WorkingDir': '/app'},
        'Html': '<a href=\'x\'>&"</a>',
        'Unicode': 'héllo wörld ☃',
        'Mixed': [1, 'a', None, True, 2.5]}

# (template, missingkey option, ("output"|"error", text)): the text is Go's.
CASES = [
    ('{{.Name}}', '', ('output', 'web')),
    ('{{.Name}} is {{.Size}} bytes', '', ('output', 'web is 1234567 bytes')),
    ('{{.Config.Cmd}}', '', ('output', '[sh -c echo hi]')),
    ('{{.Config.WorkingDir}}', '', ('output', '/app')),
    ('{{.Nosuch}}', '', ('output', '<no value>')),
    ('{{.Nosuch.Deeper}}', '', ('output', '<no value>')),
    ('{{.Labels.a}}', '', ('output', '1')),
    ('{{.Labels.zz}}', '', ('output', '<no value>')),
    ('{{.Nil}}', '', ('output', '<no value>')),
    ('{{.Nil.x}}', '', ('error', 'template: :1:6: executing "" at <.Nil.x>: nil pointer evaluating interface {}.x')),
    ('{{.Name.x}}', '', ('error', 'template: :1:7: executing "" at <.Name.x>: can\'t evaluate field x in type interface {}')),
    ('{{.Labels}}', '', ('output', 'map[a:1 b:2 com.example.x:y]')),
    ('{{.NoLabels}}', '', ('output', 'map[]')),
    ('{{.Tags}}', '', ('output', '[v1 latest]')),
    ('{{.NoTags}}', '', ('output', '[]')),
    ('{{.Mixed}}', '', ('output', '[1 a <nil> true 2.5]')),
    ('{{.}}', '', ('output', 'map[Big:1e+21 Config:map[Cmd:[sh -c echo hi] Env:<nil> User: WorkingDir:/app] Empty: Html:<a href=\'x\'>&"</a> Labels:map[a:1 b:2 com.example.x:y] Mixed:[1 a <nil> true 2.5] Name:web Nil:<nil> NoLabels:map[] NoTags:[] Nums:[3 1 2] Off:false On:true Ratio:0.25 Size:1234567 Tags:[v1 latest] Unicode:héllo wörld ☃]')),
    ('{{.Ratio}} {{.Big}} {{.On}} {{.Off}}', '', ('output', '0.25 1e+21 true false')),
    ('{{.Config.Env}}', '', ('output', '<no value>')),
    ('{{$}}', '', ('output', 'map[Big:1e+21 Config:map[Cmd:[sh -c echo hi] Env:<nil> User: WorkingDir:/app] Empty: Html:<a href=\'x\'>&"</a> Labels:map[a:1 b:2 com.example.x:y] Mixed:[1 a <nil> true 2.5] Name:web Nil:<nil> NoLabels:map[] NoTags:[] Nums:[3 1 2] Off:false On:true Ratio:0.25 Size:1234567 Tags:[v1 latest] Unicode:héllo wörld ☃]')),
    ('{{.Config}}', '', ('output', 'map[Cmd:[sh -c echo hi] Env:<nil> User: WorkingDir:/app]')),
    ('{{1}} {{-1}} {{1.5}} {{1e3}} {{0x1F}} {{\'a\'}} {{true}} {{"s\\tq"}} {{`raw\\n`}} {{0o17}} {{1_000}}', '', ('output', '1 -1 1.5 1000 31 97 true s\tq raw\\n 15 1000')),
    ('{{nil}}', '', ('error', 'template: :1:2: executing "" at <nil>: nil is not a command')),
    ('{{print nil}}', '', ('output', '<nil>')),
    ('{{print 1 2 "a" "b" 3}}', '', ('output', '1 2ab3')),
    ('{{println 1 "a"}}', '', ('output', '1 a\n')),
    ('a  {{- .Name -}}  b', '', ('output', 'awebb')),
    ('a {{-/* c */-}} b', '', ('error', 'template: :1: illegal number syntax: "-"')),
    ('x{{/* comment */}}y', '', ('output', 'xy')),
    ('{{- .Name}}\n', '', ('output', 'web\n')),
    ('a\n{{- 3}}', '', ('output', 'a3')),
    ('{{ .Name }}', '', ('output', 'web')),
    ('{{-3}}', '', ('output', '-3')),
    ('{{.Name | printf "%s!"}}', '', ('output', 'web!')),
    ('{{.Name | printf "%s-%s" "x"}}', '', ('output', 'x-web')),
    ('{{(.Name)}}', '', ('output', 'web')),
    ('{{(index .Labels "a") | len}}', '', ('output', '1')),
    ('{{$x := .Name}}{{$x}}{{$x = "z"}}{{$x}}', '', ('output', 'webz')),
    ('{{$x := 1}}{{if true}}{{$x = 2}}{{end}}{{$x}}', '', ('output', '2')),
    ('{{with $c := .Config}}{{$c.WorkingDir}}{{end}}', '', ('output', '/app')),
    ('{{(index .Config.Cmd 0)}}', '', ('output', 'sh')),
    ('{{$.Name}}', '', ('output', 'web')),
    ('{{if .On}}yes{{end}}', '', ('output', 'yes')),
    ('{{if .Off}}yes{{else}}no{{end}}', '', ('output', 'no')),
    ('{{if .Nosuch}}y{{else if .Empty}}e{{else}}n{{end}}', '', ('output', 'n')),
    ('{{if and .On .Name}}both{{end}}', '', ('output', 'both')),
    ('{{if or .Off .Empty}}x{{else}}none{{end}}', '', ('output', 'none')),
    ('{{and 1 0 2}} {{or 0 "" 3}}', '', ('output', '0 3')),
    ('{{not .On}} {{not .Nosuch}} {{not .NoTags}}', '', ('output', 'false true true')),
    ('{{range .Tags}}[{{.}}]{{end}}', '', ('output', '[v1][latest]')),
    ('{{range $i, $t := .Tags}}{{$i}}:{{$t}} {{end}}', '', ('output', '0:v1 1:latest ')),
    ('{{range $k, $v := .Labels}}{{$k}}={{$v}};{{end}}', '', ('output', 'a=1;b=2;com.example.x=y;')),
    ('{{range .NoTags}}x{{else}}empty{{end}}', '', ('output', 'empty')),
    ('{{range .Nosuch}}x{{else}}missing{{end}}', '', ('output', 'missing')),
    ('{{range .Nums}}{{if eq . 1}}{{break}}{{end}}{{.}}{{end}}', '', ('output', '3')),
    ('{{range .Nums}}{{if eq . 1}}{{continue}}{{end}}{{.}}{{end}}', '', ('output', '32')),
    ('{{range $v := .Nums}}{{$v}}{{end}}', '', ('output', '312')),
    ('{{with .Config}}{{.WorkingDir}}{{end}}', '', ('output', '/app')),
    ('{{with .Nosuch}}x{{else}}none{{end}}', '', ('output', 'none')),
    ('{{range .Name}}{{end}}', '', ('error', 'template: :1:8: executing "" at <.Name>: range can\'t iterate over web')),
    ('{{range $i, $e := .Mixed}}{{$i}}{{$e}}|{{end}}', '', ('output', '01|1a|2<no value>|3true|42.5|')),
    ('{{define "T"}}<{{.}}>{{end}}{{template "T" .Name}}', '', ('output', '<web>')),
    ('{{block "B" .Tags}}{{len .}}{{end}}', '', ('output', '2')),
    ('{{template "nosuch"}}', '', ('error', 'template: :1:11: executing "" at <{{template "nosuch"}}>: template "nosuch" not defined')),
    ('{{define "R"}}{{if .}}{{index . 0}}{{template "R" (slice . 1)}}{{end}}{{end}}{{template "R" .Nums}}', '', ('output', '312')),
    ('{{len .Name}} {{len .Tags}} {{len .Labels}} {{len .Unicode}}', '', ('output', '3 2 3 17')),
    ('{{len .Size}}', '', ('error', 'template: :1:2: executing "" at <len .Size>: error calling len: len of type int64')),
    ('{{len .Nosuch}}', '', ('error', 'template: :1:2: executing "" at <len .Nosuch>: error calling len: reflect: call of reflect.Value.Type on zero Value')),
    ('{{index .Tags 1}} {{index .Labels "b"}} {{index .Labels "zz"}} {{index .Config "Cmd" 2}}', '', ('output', 'latest 2 <no value> echo hi')),
    ('{{index .Tags 5}}', '', ('error', 'template: :1:2: executing "" at <index .Tags 5>: error calling index: index out of range: 5')),
    ('{{index .Name 1}}', '', ('output', '101')),
    ('{{index .Nosuch 1}}', '', ('error', 'template: :1:2: executing "" at <index .Nosuch 1>: error calling index: index of untyped nil')),
    ('{{index .Labels 1}}', '', ('error', 'template: :1:2: executing "" at <index .Labels 1>: error calling index: value has type int; should be string')),
    ('{{slice .Name 1}} {{slice .Name 1 2}} {{slice .Tags 1}} {{slice .Nums 0 2}}', '', ('output', 'eb e [latest] [3 1]')),
    ('{{slice .Name 3 1}}', '', ('error', 'template: :1:2: executing "" at <slice .Name 3 1>: error calling slice: invalid slice index: 3 > 1')),
    ('{{html .Html}} {{js .Html}} {{urlquery .Html}}', '', ('output', '&lt;a href=&#39;x&#39;&gt;&amp;&#34;&lt;/a&gt; \\u003Ca href\\u003D\\\'x\\\'\\u003E\\u0026\\"\\u003C/a\\u003E %3Ca+href%3D%27x%27%3E%26%22%3C%2Fa%3E')),
    ('{{html 1 2}} {{js "a\\nb=c"}} {{urlquery "a b&c"}}', '', ('output', '1 2 a\\u000Ab\\u003Dc a+b%26c')),
    ('{{eq .Name "web"}} {{eq .Size 1234567}} {{eq .Name "x" "web"}} {{ne .Size 1}}', '', ('output', 'true true true true')),
    ('{{eq .Size 1.0}}', '', ('error', 'template: :1:2: executing "" at <eq .Size 1.0>: error calling eq: incompatible types for comparison')),
    ('{{eq .Name 1}}', '', ('error', 'template: :1:2: executing "" at <eq .Name 1>: error calling eq: incompatible types for comparison')),
    ('{{eq .Nosuch .Nil}}', '', ('output', 'true')),
    ('{{eq .Tags .Tags}}', '', ('error', 'template: :1:2: executing "" at <eq .Tags .Tags>: error calling eq: non-comparable type [v1 latest]: []interface {}')),
    ('{{eq .Name}}', '', ('error', 'template: :1:2: executing "" at <eq .Name>: error calling eq: missing argument for comparison')),
    ('{{lt 1 2}} {{le 2 2}} {{gt "b" "a"}} {{ge 1.5 2.5}} {{lt .Ratio 0.5}}', '', ('output', 'true true true false true')),
    ('{{lt true false}}', '', ('error', 'template: :1:2: executing "" at <lt true false>: error calling lt: invalid type for comparison')),
    ('{{lt 1 1.5}}', '', ('error', 'template: :1:2: executing "" at <lt 1 1.5>: error calling lt: incompatible types for comparison')),
    ('{{printf "%d|%5d|%-5d|%05d|%x|%X|%o|%b|%c|%q|%U" 42 42 42 42 255 255 8 5 65 65 65}}', '', ('output', "42|   42|42   |00042|ff|FF|10|101|A|'A'|U+0041")),
    ('{{printf "%s|%10s|%-10s|%.2s|%q|%x|%v" "abc" "abc" "abc" "abc" "a\\"b" "hi" "v"}}', '', ('output', 'abc|       abc|abc       |ab|"a\\"b"|6869|v')),
    ('{{printf "%f|%.2f|%e|%g|%v|%8.3f|%G" 3.14159 3.14159 1234.5 0.000012 2.5 3.14159 1e21}}', '', ('output', '3.141590|3.14|1.234500e+03|1.2e-05|2.5|   3.142|1E+21')),
    ('{{printf "%t|%v|%v|%v|%T|%T|%T" true .Tags .Labels .Nil .Name .Size .Tags}}', '', ('output', 'true|[v1 latest]|map[a:1 b:2 com.example.x:y]|<nil>|string|int64|[]interface {}')),
    ('{{printf "%d" "x"}}|{{printf "%s" 5}}|{{printf "%d %d" 1}}|{{printf "%d" 1 2}}|{{printf "%z" 1}}|{{printf "100%%"}}|{{printf "%"}}', '', ('output', '%!d(string=x)|%!s(int=5)|1 %!d(MISSING)|1%!(EXTRA int=2)|%!z(int=1)|100%|%!(NOVERB)')),
    ('{{printf "%s" .Tags}} {{printf "%d" .Nums}} {{printf "%q" .Tags}} {{printf "%s" .Nosuch}} {{printf "%v" .Mixed}}', '', ('output', '[v1 latest] [3 1 2] ["v1" "latest"] %!s(<nil>) [1 a <nil> true 2.5]')),
    ('{{printf "%+d|% d|%+.1f|%#x|%#o" 5 5 2.25 255 8}}', '', ('output', '+5| 5|+2.2|0xff|010')),
    ('{{printf "%s" .Labels}}', '', ('output', 'map[a:1 b:2 com.example.x:y]')),
    ('{{json .Labels}} {{json .Tags}} {{json .Html}} {{json .Nil}} {{json .Ratio}} {{json .Big}}', '', ('output', '{"a":"1","b":"2","com.example.x":"y"} ["v1","latest"] "<a href=\'x\'>&\\"</a>" null 0.25 1e+21')),
    ('{{json .}}', '', ('output', '{"Big":1e+21,"Config":{"Cmd":["sh","-c","echo hi"],"Env":null,"User":"","WorkingDir":"/app"},"Empty":"","Html":"<a href=\'x\'>&\\"</a>","Labels":{"a":"1","b":"2","com.example.x":"y"},"Mixed":[1,"a",null,true,2.5],"Name":"web","Nil":null,"NoLabels":{},"NoTags":[],"Nums":[3,1,2],"Off":false,"On":true,"Ratio":0.25,"Size":1234567,"Tags":["v1","latest"],"Unicode":"héllo wörld ☃"}')),
    ('{{json .Nosuch}}', '', ('output', 'null')),
    ('{{json .Unicode}}', '', ('output', '"héllo wörld ☃"')),
    ('{{join .Tags ", "}}|{{join .Nums "+"}}|{{join .Labels ","}}|{{join .Nosuch ","}}|{{join .NoTags ","}}', '', ('output', 'v1, latest|3+1+2|1,2,y||')),
    ('{{join .Name ","}}', '', ('error', 'template: :1:2: executing "" at <join .Name ",">: error calling join: expected slice, got string')),
    ('{{split "a,b,,c" ","}} {{len (split .Name "")}} {{index (split "k=v" "=") 1}}', '', ('output', '[a b  c] 3 v')),
    ('{{lower "ABC"}} {{upper .Name}} {{title "hello wide-world foo_bar"}} {{title .Unicode}}', '', ('output', 'abc WEB Hello Wide-World Foo_bar Héllo Wörld ☃')),
    ('[{{pad .Name 2 3}}] [{{pad .Empty 2 3}}] [{{truncate .Name 2}}] [{{truncate .Name 10}}] [{{truncate .Name 3}}]', '', ('output', '[  web   ] [] [we] [web] [web]')),
    ('{{lower .Size}}', '', ('error', 'template: :1:8: executing "" at <.Size>: wrong type for value; expected string; got int64')),
    ('{{lower .Nosuch}}', '', ('error', 'template: :1:8: executing "" at <.Nosuch>: invalid value; expected string')),
    ('{{.Nosuch | lower}}', '', ('error', 'template: :1:12: executing "" at <lower>: invalid value; expected string')),
    ('{{truncate .Name .Size}}', '', ('error', 'template: :1:17: executing "" at <.Size>: wrong type for value; expected int; got int64')),
    ('{{pad .Name 1}}', '', ('error', 'template: :1:2: executing "" at <pad>: wrong number of args for pad: want 3 got 2')),
    ('{{.Name | upper | printf "%s!"}}', '', ('output', 'WEB!')),
    ('{{.Tags | join ","}}', '', ('error', 'template: :1:15: executing "" at <",">: wrong type for value; expected string; got []interface {}')),
    ('{{upper 3}}', '', ('error', 'template: :1:8: executing "" at <3>: expected string; found 3')),
    ('{{join .Tags}}', '', ('error', 'template: :1:2: executing "" at <join>: wrong number of args for join: want 2 got 1')),
    ('{{range split "a:b" ":"}}{{.}};{{end}}', '', ('output', 'a;b;')),
    ('{{.Name', '', ('error', 'template: :1: unclosed action')),
    ('{{.Name}', '', ('error', "template: :1: bad character U+007D '}'")),
    ('{{if .On}}x', '', ('error', 'template: :1: unexpected EOF')),
    ('{{end}}', '', ('error', 'template: :1: unexpected {{end}}')),
    ('{{else}}', '', ('error', 'template: :1: unexpected {{else}}')),
    ('{{nosuch .Name}}', '', ('error', 'template: :1: function "nosuch" not defined')),
    ('{{$undefined}}', '', ('error', 'template: :1: undefined variable "$undefined"')),
    ('{{.Name | "x"}}', '', ('error', 'template: :1: non executable command in pipeline stage 2')),
    ('{{if}}{{end}}', '', ('error', 'template: :1: missing value for if')),
    ('{{range}}{{end}}', '', ('error', 'template: :1: missing value for range')),
    ('{{/* unclosed', '', ('error', 'template: :1: unclosed comment')),
    ('{{/* c */ x}}', '', ('error', 'template: :1: comment ends before closing delimiter')),
    ('{{3x}}', '', ('error', 'template: :1: bad number syntax: "3x"')),
    ('{{#}}', '', ('error', 'template: :1: unexpected "#" in command')),
    ('{{(.Name}}', '', ('error', 'template: :1: unclosed left paren')),
    ('{{.Name)}}', '', ('error', 'template: :1: unexpected ")" in command')),
    ('{{"unterminated}}', '', ('error', 'template: :1: unterminated quoted string')),
    ('{{break}}', '', ('error', 'template: :1: {{break}} outside {{range}}')),
    ('{{define "x"}}{{end}}{{template 3}}', '', ('error', 'template: :1: unexpected "3" in template clause')),
    ('{{range $a, $b, $c := .Tags}}{{end}}', '', ('error', 'template: :1: too many declarations in range')),
    ('line1\nline2 {{.X\n}}{{if}}', '', ('error', 'template: :3: missing value for if')),
    ('{{.Name.}}', '', ('error', 'template: :1: unexpected <.> in operand')),
    ('{{1.x}}', '', ('error', 'template: :1: bad number syntax: "1.x"')),
    ('{{.Name 1}}', '', ('error', 'template: :1:2: executing "" at <.Name>: Name is not a method but has arguments')),
    ('{{"x" 1}}', '', ('error', 'template: :1:2: executing "" at <"x">: can\'t give argument to non-function "x"')),
    ('{{index .Tags "a"}}', '', ('error', 'template: :1:2: executing "" at <index .Tags "a">: error calling index: cannot index slice/array with type string')),
    ('{{eq}}', '', ('error', 'template: :1:2: executing "" at <eq>: wrong number of args for eq: want at least 1 got 0')),
    ('{{printf}}', '', ('error', 'template: :1:2: executing "" at <printf>: wrong number of args for printf: want at least 1 got 0')),
    ('{{lt .Tags 1}}', '', ('error', 'template: :1:2: executing "" at <lt .Tags 1>: error calling lt: invalid type for comparison')),
    ('line one\n  {{.Nil.Field}}', '', ('error', 'template: :2:8: executing "" at <.Nil.Field>: nil pointer evaluating interface {}.Field')),
    ('{{$x := 1}}{{$x.y}}', '', ('error', 'template: :1:15: executing "" at <$x.y>: can\'t evaluate field y in type int')),
    ('{{if .Tags}}{{template "none" .}}{{end}}', '', ('error', 'template: :1:23: executing "" at <{{template "none" .}}>: template "none" not defined')),
    ('{{with .Nums}}{{.Deep}}{{end}}', '', ('error', 'template: :1:16: executing "" at <.Deep>: can\'t evaluate field Deep in type []interface {}')),
    ('{{range .Tags}}{{.Field}}{{end}}', '', ('error', 'template: :1:17: executing "" at <.Field>: can\'t evaluate field Field in type interface {}')),
    ('{{slice .Labels 1}}', '', ('error', 'template: :1:2: executing "" at <slice .Labels 1>: error calling slice: can\'t slice item of type map[string]interface {}')),
    ('{{index . "Tags" 0 1}}', '', ('output', '49')),
    ('{{(index .Tags 0).Field}}', '', ('error', 'template: :1:15: executing "" at <0>: can\'t evaluate field Field in type string')),
    ('{{.Config.Cmd.Field}}', '', ('error', 'template: :1:9: executing "" at <.Config.Cmd.Field>: can\'t evaluate field Field in type interface {}')),
    ('{{range .Names}}', '', ('error', 'template: :1: unexpected EOF')),
    ('{{if .On}}', '', ('error', 'template: :1: unexpected EOF')),
    ('{{with .Config}}a', '', ('error', 'template: :1: unexpected EOF')),
    ('{{define "x"}}', '', ('error', 'template: :1: unexpected EOF')),
    ('{{block "b" .}}', '', ('error', 'template: :1: unexpected EOF')),
    ('{{if .On}}{{else}}', '', ('error', 'template: :1: unexpected EOF')),
    ('{{range .Tags}}{{$x := .}}{{end}}{{$x}}', '', ('error', 'template: :1: undefined variable "$x"')),
    ('{{$x := 1}}{{range .Nums}}{{$x = .}}{{end}}{{$x}}', '', ('output', '2')),
    ('a {{- /* trimmed */ -}} b', '', ('output', 'ab')),
    ('{{"a" | printf "%s%s" "b"}}', '', ('output', 'ba')),
    ('{{index .Mixed 2}}', '', ('output', '<no value>')),
    ('{{printf "%v" (index .Mixed 2)}}', '', ('output', '<nil>')),
    ('{{if (index .Mixed 2)}}t{{else}}f{{end}}', '', ('output', 'f')),
    ('{{len "héllo"}}', '', ('output', '6')),
    ('{{slice "héllo" 0 3}}', '', ('output', 'hé')),
    ('{{printf "%5.1f|%-8.3s|%08.3f" 3.14159 "abcdef" -3.14159}}', '', ('output', '  3.1|abc     |-003.142')),
    ('{{printf "%x" -255}}', '', ('output', '-ff')),
    ('{{printf "%c%c" 0x263A 65}}', '', ('output', '☺A')),
    ('{{printf "%U" 0x1F600}}', '', ('output', 'U+1F600')),
    ('{{printf "%q" 0x1F600}}', '', ('output', "'😀'")),
    ('{{printf "%e" 0.0}}', '', ('output', '0.000000e+00')),
    ('{{printf "%g" 100000000.0}}', '', ('output', '1e+08')),
    ('{{printf "%.3g" 1234.5678}}', '', ('output', '1.23e+03')),
    ('{{printf "%v" 1e100}}', '', ('output', '1e+100')),
    ('{{json 1.0}}', '', ('output', '1')),
    ('{{json 0.1}}', '', ('output', '0.1')),
    ('{{json 1e-7}}', '', ('output', '1e-7')),
    ('{{.Size | printf "%d"}}', '', ('output', '1234567')),
    ('{{printf "%6.2f%%" 12.345}}', '', ('output', ' 12.35%')),
    ('{{printf "%s" true}}', '', ('output', '%!s(bool=true)')),
    ('{{printf "%d" true}}', '', ('output', '%!d(bool=true)')),
    ('{{printf "%t" 1}}', '', ('output', '%!t(int=1)')),
    ('{{printf "%v %v" .NoLabels .NoTags}}', '', ('output', 'map[] []')),
    ('{{printf "%+v" .Labels}}', '', ('output', 'map[a:1 b:2 com.example.x:y]')),
    ('{{print .Nil}}', '', ('output', '<nil>')),
    ('{{print .Nosuch}}', '', ('output', '<nil>')),
    ('{{println}}', '', ('output', '\n')),
    ('{{print}}', '', ('output', '')),
    ('{{html}}', '', ('output', '')),
    ('{{urlquery .Unicode}}', '', ('output', 'h%C3%A9llo+w%C3%B6rld+%E2%98%83')),
    ('{{js .Unicode}}', '', ('output', 'héllo wörld ☃')),
    ('{{title "ünïcode wörds"}}', '', ('output', 'Ünïcode Wörds')),
    ('{{upper .Unicode}}', '', ('output', 'HÉLLO WÖRLD ☃')),
    ('{{lower "ÀÉÎ"}}', '', ('output', 'àéî')),
    ('{{split .Name ""}}', '', ('output', '[w e b]')),
    ('{{join (split "a b c" " ") "-"}}', '', ('output', 'a-b-c')),
    ('{{pad "x" 0 0}}', '', ('output', 'x')),
    ('{{printf "%10v|%-10v|" .Tags .On}}', '', ('output', '[        v1     latest]|true      |')),
    ('{{range $i, $t := .Tags}}{{if $i}}, {{end}}{{$t}}{{end}}', '', ('output', 'v1, latest')),
    ('{{range .Nums}}{{range $.Tags}}{{if eq . "latest"}}{{break}}{{end}}{{.}}{{end}};{{end}}', '', ('output', 'v1;v1;v1;')),
    ('{{with .Config}}{{$.Name}}/{{.WorkingDir}}{{end}}', '', ('output', 'web//app')),
    ('{{template "T"}}{{define "T"}}t{{end}}', '', ('output', 't')),
    ('{{define "T"}}a{{end}}{{define "T"}}b{{end}}{{template "T"}}', '', ('error', 'template: :1: template: multiple definition of template "T"')),
    ('{{block "B" .}}default{{end}}{{define "B"}}over{{end}}', '', ('error', 'template: :1: template: multiple definition of template "B"')),
    ('{{.Labels.com.example.x}}', '', ('output', '<no value>')),
    ('{{index .Labels "com.example.x"}}', '', ('output', 'y')),
    ('{{eq .Nosuch ""}}', '', ('output', 'false')),
    ('{{eq .Nil nil}}', '', ('output', 'true')),
    ('{{ne .Name "web"}} {{ne 1 2}}', '', ('output', 'false true')),
    ('{{if and .Nosuch .Nosuch.x}}x{{else}}short-circuit{{end}}', '', ('output', 'short-circuit')),
    ('{{or .Nosuch "default"}}', '', ('output', 'default')),
    ('{{and .Name "second"}}', '', ('output', 'second')),
    ('{{$n := len .Tags}}{{if gt $n 1}}many{{end}}', '', ('output', 'many')),
    ('{{printf "%d items" (len .Tags)}}', '', ('output', '2 items')),
    ('{{.Config.Cmd | join " "}}', '', ('error', 'template: :1:21: executing "" at <" ">: wrong type for value; expected string; got []interface {}')),
    ('{{range $k, $v := .Config}}{{$k}} {{end}}', '', ('output', 'Cmd Env User WorkingDir ')),
    ('{{printf "%T %T %T %T" 1 1.5 "s" true}}', '', ('output', 'int float64 string bool')),
    ('{{printf "%T" .Labels}} {{printf "%T" .Mixed}} {{printf "%T" nil}}', '', ('output', 'map[string]interface {} []interface {} <nil>')),
    ('{{printf "%05s|%.0f|%+.2e" "ab" 2.5 12345.678}}', '', ('output', '000ab|2|+1.23e+04')),
    ('{{printf "%3c|%-4q|" 65 66}}', '', ('output', "  A|'B' |")),
    ('{{- range .Tags }}\n  {{ . }}\n{{- end }}', '', ('output', '\n  v1\n  latest')),
    ('{{ 3 | printf "%d" }}', '', ('output', '3')),
    ('{{"a" | len}}', '', ('output', '1')),
    ('{{.Nosuch}}', 'error', ('error', 'template: :1:2: executing "" at <.Nosuch>: map has no entry for key "Nosuch"')),
    ('{{.Labels.zz}}', 'error', ('error', 'template: :1:9: executing "" at <.Labels.zz>: map has no entry for key "zz"')),
    ('{{.Name}}', 'error', ('output', 'web')),
    ('{{.Nosuch.x}}', 'error', ('error', 'template: :1:9: executing "" at <.Nosuch.x>: map has no entry for key "Nosuch"')),
    ('{{index .Labels "zz"}}', 'error', ('output', '<no value>')),
]

# (the text written to a tab writer configured as docker's, what Go's text/tabwriter printed)
TABLES = [
    ('REPOSITORY\tTAG\tIMAGE ID\nbusybox\tlatest\tabc\n', 'REPOSITORY   TAG       IMAGE ID\nbusybox      latest    abc\n'),
    ('a\tb\nccccccccccccccccc\td\n', 'a                   b\nccccccccccccccccc   d\n'),
    ('x\ty\tz\n\nlong text here\tq\n', 'x         y         z\n\nlong text here   q\n'),
    ('ID\tSIZE\n1\t\n2\t3\n', 'ID        SIZE\n1         \n2         3\n'),
    ('a\tb\tc\n1\t2\n', 'a         b         c\n1         2\n'),
    ('no tabs\nat all\n', 'no tabs\nat all\n'),
    ('trailing\t\n', 'trailing   \n'),
    ('héllo\twörld\nx\ty\n', 'héllo     wörld\nx         y\n'),
    ('a\tb\n\tc\n', 'a         b\n          c\n'),
    ('', ''),
    ('partial line\tno newline', 'partial line   no newline'),
]

def run(template: str, missing_key: str) -> tuple[str, str]:
    try:
        return "output", Template.parse(template).execute(DATA, missing_key_error=missing_key == "error")
    except TemplateError as e:
        return "error", str(e)


@pytest.mark.parametrize(("template", "missing_key", "expected"), CASES,
                         ids=[f"{i}:{c[0][:30]}" for i, c in enumerate(CASES)])
def test_template_as_go(template: str, missing_key: str, expected: tuple[str, str]) -> None:
    assert run(template, missing_key) == expected


@pytest.mark.parametrize(("text", "expected"), TABLES, ids=[str(i) for i in range(len(TABLES))])
def test_tabwriter_as_go(text: str, expected: str) -> None:
    assert tabwrite(text) == expected


def test_gotemplate_oracle_matches() -> None:
    """Run every case through Go again (opt-in): LAMINA_GOTEMPLATE_ORACLE names a Go program that
    reads a JSON list of {"template", "data", "missingkey", "tabwriter"} on stdin and prints a list
    of {"output"} or {"error", "output"}, executing text/template with docker/cli's functions (its
    templates/templates.go) and text/tabwriter as NewWriter(out, 10, 1, 3, ' ', 0)."""
    oracle = os.environ.get("LAMINA_GOTEMPLATE_ORACLE")
    if not oracle:
        pytest.skip("outside reference: set LAMINA_GOTEMPLATE_ORACLE to the Go oracle program")
    jobs = [{"template": t, "data": DATA, "missingkey": mk} for t, mk, _ in CASES]
    jobs += [{"template": text, "tabwriter": True} for text, _ in TABLES]
    answers = json.loads(subprocess.run([oracle], input=json.dumps(jobs), capture_output=True, text=True,
                                        check=True, timeout=120).stdout)
    differences = []
    for (template, missing_key, expected), answer in zip(CASES, answers, strict=False):
        go = ("error", answer["error"]) if "error" in answer else ("output", answer["output"])
        if go != expected or run(template, missing_key) != go:
            differences.append((template, go, run(template, missing_key)))
    for (text, _), answer in zip(TABLES, answers[len(CASES):], strict=True):
        if tabwrite(text) != answer["output"]:
            differences.append((text, answer["output"], tabwrite(text)))
    assert not differences
