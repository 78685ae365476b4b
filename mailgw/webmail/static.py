"""The webmail's style sheet and its one small script (served from ``/static/``, the only
script the pages' Content-Security-Policy lets run)."""

from __future__ import annotations

CSS = """
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI","PingFang SC","Hiragino Sans GB",
"Microsoft YaHei","Noto Sans CJK SC",sans-serif;color:#1d2330;background:#f4f6f9}
a{color:#1f5fbf}
header{display:flex;flex-wrap:wrap;gap:.5em;align-items:center;padding:.5em 1em;background:#24364f;color:#fff}
header a,header button{color:#fff}
header .who{margin-left:auto;opacity:.85}
header form{display:inline;margin:0}
.wrap{display:flex;min-height:calc(100vh - 3em)}
nav{width:14em;flex:none;padding:.5em;background:#fff;border-right:1px solid #dde2ea}
nav ul{list-style:none;margin:0;padding:0}
nav li a{display:flex;justify-content:space-between;padding:.35em .6em;border-radius:4px;text-decoration:none;color:#1d2330}
nav li a.cur{background:#e3ebf7;font-weight:600}
nav .count{color:#fff;background:#1f5fbf;border-radius:1em;padding:0 .5em;font-size:.8em}
main{flex:1;min-width:0;padding:1em}
table.list{width:100%;border-collapse:collapse;background:#fff}
table.list td,table.list th{padding:.4em .5em;border-bottom:1px solid #eef1f5;text-align:left;vertical-align:top}
table.list tr.unseen td{font-weight:600}
table.list td.subj{overflow-wrap:anywhere}
table.list tr.child td.subj{padding-left:2em}
td.date{white-space:nowrap;color:#566}
.tools{display:flex;flex-wrap:wrap;gap:.4em;align-items:center;margin:.5em 0}
.tools form{display:inline;margin:0}
button,.button,input[type=submit]{font:inherit;padding:.3em .8em;border:1px solid #b8c2d0;border-radius:4px;background:#fff;color:#1d2330;cursor:pointer;text-decoration:none}
button.primary{background:#1f5fbf;color:#fff;border-color:#1f5fbf}
input[type=text],input[type=email],input[type=password],input[type=search],textarea,select{font:inherit;padding:.35em;border:1px solid #b8c2d0;border-radius:4px;max-width:100%}
.compose label{display:block;margin:.4em 0 .1em;color:#566}
.compose input[type=text],.compose textarea{width:100%}
.compose textarea{min-height:16em}
.msghead{background:#fff;padding:.8em;border:1px solid #dde2ea;border-radius:6px}
.msghead h1{font-size:1.25em;margin:0 0 .4em;overflow-wrap:anywhere}
.msghead dl{display:grid;grid-template-columns:max-content 1fr;gap:.1em .8em;margin:0}
.msghead dt{color:#566}.msghead dd{margin:0;overflow-wrap:anywhere}
pre.text{white-space:pre-wrap;overflow-wrap:anywhere;background:#fff;padding:.8em;border:1px solid #dde2ea;border-radius:6px;font:inherit}
iframe.html{width:100%;height:70vh;border:1px solid #dde2ea;border-radius:6px;background:#fff}
.notice{padding:.5em .8em;background:#fff6d8;border:1px solid #ecd58a;border-radius:4px;margin:.5em 0}
.error{padding:.5em .8em;background:#fde8e8;border:1px solid #e6a0a0;border-radius:4px;margin:.5em 0}
.login{max-width:22em;margin:10vh auto;background:#fff;padding:1.5em;border-radius:8px;border:1px solid #dde2ea}
.login input{width:100%;margin:.2em 0 .8em}
ul.atts{padding-left:1.2em}
.pager{margin:.6em 0;display:flex;gap:.6em;align-items:center}
.flag{color:#d08b00}
@media (max-width:700px){
 .wrap{display:block}
 nav{width:auto;border-right:0;border-bottom:1px solid #dde2ea}
 nav ul{display:flex;flex-wrap:wrap;gap:.2em}
 table.list td.from,table.list th.from{display:none}
 td.date{font-size:.85em}
 iframe.html{height:60vh}
}
"""

JS = """
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  var all = document.getElementById("select-all");
  if (all) {
    all.addEventListener("change", function () {
      document.querySelectorAll("input[name=uid]").forEach(function (c) { c.checked = all.checked; });
    });
  }
});
"""
