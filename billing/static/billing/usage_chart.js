// Draws the usage page's two charts (spend and tokens per period, one line per model or key)
// with uPlot, from the JSON the page embeds. The table under the charts has the same figures.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("usage-chart-data").textContent);
  var palette = ["#1f56c4", "#d9480f", "#2b8a3e", "#862e9c", "#c92a2a", "#0b7285", "#e67700", "#5c940d"];

  function draw(elementId, field, unit) {
    var el = document.getElementById(elementId);
    var series = [{}];
    var columns = [data.x];
    data.series.forEach(function (s, i) {
      series.push({
        label: s.label,
        stroke: palette[i % palette.length],
        width: 2,
        points: { show: true },
        value: function (u, v) { return v == null ? "-" : v + " " + unit; },
      });
      // Spend arrives as exact decimal strings; the chart only needs them approximately.
      columns.push(s[field].map(Number));
    });
    if (data.series.length === 0) {
      series.push({ label: "no requests", stroke: "#b9c0cc" });
      columns.push(data.x.map(function () { return 0; }));
    }
    var width = Math.max(280, el.clientWidth || 600);
    var yAxis = {
      size: 84,
      // Small amounts (fractions of a cent) would all round to "0" with the default labels.
      values: function (u, ticks) {
        return ticks.map(function (v) { return v === 0 ? "0" : Number(v.toPrecision(3)).toString(); });
      },
    };
    new uPlot(
      {
        width: width, height: 260, series: series, scales: { x: { time: true } }, axes: [{}, yAxis],
        // Periods are UTC days, weeks and months: label them in UTC, not the browser's zone.
        tzDate: function (ts) { return uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"); },
      },
      columns,
      el
    );
    el.dataset.drawn = "true";
  }

  draw("spend-chart", "cost_usd", "USD");
  draw("tokens-chart", "tokens", "tokens");
})();
