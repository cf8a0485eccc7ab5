/* rloop report: sortable tables, row filters and plotly figures. Plain JS, no network. */
(function () {
  "use strict";

  function sortKey(cell) {
    if (!cell) return "";
    var value = cell.getAttribute("data-value");
    return (value !== null ? value : cell.textContent).trim();
  }

  function isMissing(key) {
    return key === "" || key === "NaN";
  }

  function compareKeys(a, b) {
    if (isMissing(a) || isMissing(b)) {
      return isMissing(a) === isMissing(b) ? 0 : isMissing(a) ? 1 : -1;
    }
    var x = Number(a), y = Number(b);
    if (!isNaN(x) && !isNaN(y)) return x - y;
    return a.localeCompare(b, undefined, { numeric: true, sensitivity: "base" });
  }

  function sortTable(table, column, descending) {
    var body = table.tBodies[0];
    if (!body) return;
    var rows = Array.prototype.slice.call(body.rows);
    var keyed = rows.map(function (row, position) {
      return { row: row, key: sortKey(row.cells[column]), position: position };
    });
    keyed.sort(function (p, q) {
      var order = compareKeys(p.key, q.key);
      if (descending && !isMissing(p.key) && !isMissing(q.key)) order = -order;
      return order || p.position - q.position;
    });
    keyed.forEach(function (item) { body.appendChild(item.row); });
  }

  function makeSortable(table) {
    var head = table.tHead;
    if (!head || !head.rows.length) return;
    var headers = head.rows[0].cells;
    Array.prototype.forEach.call(headers, function (header, column) {
      header.setAttribute("tabindex", "0");
      header.setAttribute("title", "Sort by " + header.textContent.trim());
      function activate() {
        var descending = header.getAttribute("aria-sort") === "ascending";
        Array.prototype.forEach.call(headers, function (h) { h.removeAttribute("aria-sort"); });
        header.setAttribute("aria-sort", descending ? "descending" : "ascending");
        sortTable(table, column, descending);
      }
      header.addEventListener("click", activate);
      header.addEventListener("keydown", function (event) {
        if (event.key === "Enter" || event.key === " ") { event.preventDefault(); activate(); }
      });
    });
  }

  function setupTableFilter(input) {
    var table = document.getElementById(input.getAttribute("data-target"));
    if (!table || !table.tBodies[0]) return;
    input.addEventListener("input", function () {
      var needle = input.value.trim().toLowerCase();
      Array.prototype.forEach.call(table.tBodies[0].rows, function (row) {
        row.hidden = needle !== "" && row.textContent.toLowerCase().indexOf(needle) < 0;
      });
    });
  }

  function setupIndexFilters() {
    var selects = document.querySelectorAll("select[data-filter]");
    var text = document.getElementById("filter-text");
    if (!selects.length) return;
    var count = document.getElementById("filter-count");
    function apply() {
      var wanted = {};
      Array.prototype.forEach.call(selects, function (s) { wanted[s.getAttribute("data-filter")] = s.value; });
      var needle = text ? text.value.trim().toLowerCase() : "";
      function matches(element) {
        for (var name in wanted) {
          if (wanted[name] && element.getAttribute("data-" + name) !== wanted[name]) return false;
        }
        return true;
      }
      var shown = 0, total = 0;
      document.querySelectorAll("table.filterable").forEach(function (table) {
        Array.prototype.forEach.call(table.tBodies[0].rows, function (row) {
          var visible = matches(row) && (needle === "" || row.textContent.toLowerCase().indexOf(needle) >= 0);
          row.hidden = !visible;
          if (table.id === "runs") { total += 1; if (visible) shown += 1; }
        });
      });
      document.querySelectorAll("[data-section-experiment]").forEach(function (section) {
        var experiment = wanted.experiment;
        section.hidden = Boolean(experiment) && section.getAttribute("data-section-experiment") !== experiment;
      });
      document.querySelectorAll(".compare-list li[data-experiment]").forEach(function (item) {
        item.hidden = Boolean(wanted.experiment) && item.getAttribute("data-experiment") !== wanted.experiment;
      });
      if (count) count.textContent = shown + " of " + total + " runs";
    }
    Array.prototype.forEach.call(selects, function (s) { s.addEventListener("change", apply); });
    if (text) text.addEventListener("input", apply);
  }

  function renderPlots() {
    var containers = document.querySelectorAll(".plot[data-figure]");
    if (!containers.length) return;
    if (typeof window.Plotly === "undefined") {
      Array.prototype.forEach.call(containers, function (el) {
        el.className += " plot-error";
        el.textContent = "plotly.js did not load (assets/plotly.min.js missing?); the tables below hold the numbers.";
      });
      return;
    }
    Array.prototype.forEach.call(containers, function (el) {
      try {
        var source = document.getElementById(el.getAttribute("data-figure"));
        var figure = JSON.parse(source.textContent);
        window.Plotly.newPlot(el, figure.data || [], figure.layout || {}, {
          responsive: true, displaylogo: false
        });
      } catch (error) {
        el.className += " plot-error";
        el.textContent = "This figure could not be drawn: " + error.message;
        console.error("rloop report: figure " + el.getAttribute("data-figure") + ": " + error.message);
      }
    });
  }

  function start() {
    document.querySelectorAll("table.sortable").forEach(makeSortable);
    document.querySelectorAll("input.table-filter").forEach(setupTableFilter);
    setupIndexFilters();
    renderPlots();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
